"""What the model is trained and measured on: one place for task losses and metrics.

Every LightningModule in tnexp (pretrain, local, global, hybrid) asks its task how to
turn a batch into model inputs, what the task loss is and which metrics to report, so the
modules stay agnostic of classification, language modelling or feature matching. The
contract is :class:`Task`; the tasks here are :class:`ClassificationTask`,
:class:`CausalLMTask` and :class:`FeatureMatchingTask` (the student reproduces the
teacher's outputs: any encoder, embedding model or backbone). :func:`build_task` makes one
from the run config (``task=auto|features``).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar, Protocol, runtime_checkable

import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics import MeanMetric, MetricCollection, SumMetric
from torchmetrics.classification import MulticlassAccuracy

from tnexp.errors import ConfigError, TnexpError
from tnexp.modules.losses import attention_mask, feature_mask, get_distillation_loss

__all__ = [
    "FEATURE_OUTPUTS",
    "TASKS",
    "CausalLMTask",
    "ClassificationTask",
    "FeatureMatchingTask",
    "FeaturePair",
    "Task",
    "TaskError",
    "build_task",
    "task_kind",
]

TASKS = ("classification", "causal_lm", "features")


class TaskError(TnexpError, ValueError):
    """A model's outputs do not fit the task (the message names the fix)."""


@runtime_checkable
class Task(Protocol):
    """What :class:`tnexp.modules.TensorizationModule` needs from a task.

    ``monitor`` / ``mode``: the validation metric (``"val/<name>"``) that selects the best
    checkpoint, and whether it is maximised (``"max"``) or minimised (``"min"``).

    Per batch: ``model_inputs(batch)`` is what the model is called with (a tensor, or a dict
    passed as keyword arguments; its ``attention_mask``, if any, also excludes padding from
    the local slice losses); ``forward(model, batch)`` runs the model and returns whatever
    ``loss`` and ``update_metrics`` consume; ``loss(outputs, batch)`` is the scalar the
    global phase minimises.

    Per validation: ``make_metrics()`` a fresh ``MetricCollection``;
    ``update_metrics(metrics, outputs, batch, loss)`` accumulates one batch;
    ``finalize(metrics.compute())`` turns the collection's values into plain floats, logged
    as ``val/<name>`` (and written to results.json).

    A task that compares the student with the teacher (:class:`FeatureMatchingTask`) also has
    ``bind_teacher(teacher)``; the training modules and the CLI call it when they have one.
    """

    monitor: str
    mode: str

    def model_inputs(self, batch: Any) -> Any: ...

    def forward(self, model: nn.Module, batch: Any) -> Any: ...

    def loss(self, outputs: Any, batch: Any) -> torch.Tensor: ...

    def make_metrics(self) -> MetricCollection: ...

    def update_metrics(
        self, metrics: MetricCollection, outputs: Any, batch: Any, loss: torch.Tensor
    ) -> None: ...

    def finalize(self, values: dict[str, torch.Tensor]) -> dict[str, float]: ...


class ClassificationTask:
    """Image classification: cross-entropy loss, top-1 / top-5 accuracy (in percent)."""

    monitor = "val/top1"
    mode = "max"

    def __init__(self, num_classes: int):
        self.num_classes = int(num_classes)

    def model_inputs(self, batch: Any) -> torch.Tensor:
        return batch[0]

    def targets(self, batch: Any) -> torch.Tensor:
        return batch[1]

    def forward(self, model: nn.Module, batch: Any) -> torch.Tensor:
        return model(self.model_inputs(batch))

    def loss(self, outputs: torch.Tensor, batch: Any) -> torch.Tensor:
        return F.cross_entropy(outputs, self.targets(batch))

    def make_metrics(self) -> MetricCollection:
        return MetricCollection(
            {
                "top1": MulticlassAccuracy(self.num_classes, top_k=1, average="micro"),
                "top5": MulticlassAccuracy(
                    self.num_classes, top_k=min(5, self.num_classes), average="micro"
                ),
                "loss": MeanMetric(),
            }
        )

    def update_metrics(
        self, metrics: MetricCollection, outputs: torch.Tensor, batch: Any, loss: torch.Tensor
    ) -> None:
        targets = self.targets(batch)
        metrics["top1"].update(outputs, targets)
        metrics["top5"].update(outputs, targets)
        metrics["loss"].update(loss.detach(), weight=targets.numel())

    @staticmethod
    def finalize(values: dict[str, torch.Tensor]) -> dict[str, float]:
        """Metric values as plain floats; accuracies in percent like the paper's tables."""
        out = {k: float(v) for k, v in values.items()}
        for key in ("top1", "top5"):
            if key in out:
                out[key] *= 100.0
        return out


class CausalLMTask:
    """Next-token prediction: token-averaged cross-entropy and perplexity.

    Batches are dicts with ``input_ids`` (and optionally ``attention_mask`` / ``labels``)
    or a plain ``(B, T)`` tensor of token ids. Padding (``labels == -100`` or a zero
    attention mask) is excluded from loss and perplexity.
    """

    monitor = "val/ppl"
    mode = "min"

    def model_inputs(self, batch: Any) -> dict[str, torch.Tensor]:
        if isinstance(batch, torch.Tensor):
            return {"input_ids": batch}
        inputs = {"input_ids": batch["input_ids"]}
        if batch.get("attention_mask") is not None:
            inputs["attention_mask"] = batch["attention_mask"]
        return inputs

    def labels(self, batch: Any) -> torch.Tensor:
        if isinstance(batch, torch.Tensor):
            return batch
        labels = batch.get("labels")
        if labels is None:
            labels = batch["input_ids"].clone()
            if batch.get("attention_mask") is not None:
                labels = labels.masked_fill(batch["attention_mask"] == 0, -100)
        return labels

    def forward(self, model: nn.Module, batch: Any) -> torch.Tensor:
        outputs = model(**self.model_inputs(batch))
        if isinstance(outputs, torch.Tensor):
            return outputs
        logits = outputs.get("logits") if isinstance(outputs, Mapping) else None
        logits = getattr(outputs, "logits", logits)
        if not isinstance(logits, torch.Tensor):
            raise TaskError(
                f"task causal_lm needs next-token logits, but {type(model).__name__} returned "
                f"{type(outputs).__name__} without them (a model without a language-model "
                "head). Load it with its LM head (model=hf model.head=causal_lm), or compress "
                "it against the teacher's outputs with task=features."
            )
        return logits

    def _shifted(self, logits: torch.Tensor, batch: Any) -> tuple[torch.Tensor, torch.Tensor]:
        labels = self.labels(batch)[:, 1:]
        return logits[:, :-1].reshape(-1, logits.shape[-1]), labels.reshape(-1)

    def loss(self, outputs: torch.Tensor, batch: Any) -> torch.Tensor:
        logits, labels = self._shifted(outputs, batch)
        return F.cross_entropy(logits.float(), labels, ignore_index=-100)

    def make_metrics(self) -> MetricCollection:
        return MetricCollection({"loss": MeanMetric()})

    def update_metrics(
        self, metrics: MetricCollection, outputs: torch.Tensor, batch: Any, loss: torch.Tensor
    ) -> None:
        tokens = int((self.labels(batch)[:, 1:] != -100).sum())
        metrics["loss"].update(loss.detach(), weight=max(tokens, 1))

    @staticmethod
    def finalize(values: dict[str, torch.Tensor]) -> dict[str, float]:
        loss = float(values["loss"])
        return {"loss": loss, "ppl": float(torch.exp(torch.tensor(loss)))}


# =========================================================================== feature matching
# What the student is compared on: keys of the model's output (a ModelOutput or dict), or
# ``pooled`` (mean of the last hidden state over unpadded tokens: a sentence embedding)
# and ``cls`` (the first token's hidden state). Any other output key works too.
FEATURE_OUTPUTS = ("last_hidden_state", "pooled", "cls", "pooler_output", "logits")


@dataclass
class FeaturePair:
    """The student's and the teacher's features of one batch (same shape)."""

    student: torch.Tensor
    teacher: torch.Tensor
    mask: torch.Tensor | None = None  # (B, T) attention mask of token-major features


class FeatureMatchingTask:
    """The student is trained and measured against the teacher's outputs.

    For any ``nn.Module`` (a tensor output is the feature itself) and any Hugging Face
    model (``output`` picks ``last_hidden_state``, ``pooler_output``, ``logits``, ... or the
    derived ``pooled`` / ``cls`` embeddings). Padded tokens (``attention_mask == 0``) are
    excluded from the loss and the metrics.

    Metrics (``val/...``): ``rel_err`` ``||S - T|| / ||T||`` over the validation set (the
    monitored one, lower is better), ``cosine`` (mean cosine similarity of each sample's
    vector, or each unpadded token's), and for per-sample embeddings ``sim_corr``: the
    Pearson correlation between the student's and the teacher's pairwise cosine
    similarities within each batch (what retrieval and clustering use), averaged over
    batches.
    """

    monitor = "val/rel_err"
    mode = "min"
    _DERIVED: ClassVar[tuple[str, ...]] = ("pooled", "cls")

    def __init__(
        self, output: str = "last_hidden_state", loss: str = "mse", teacher: nn.Module | None = None
    ):
        if not isinstance(output, str) or not output:
            raise ConfigError(
                f"task output must be one of {FEATURE_OUTPUTS} (or a key), got {output!r}."
            )
        self.output = output
        self.loss_name = loss
        self._loss = get_distillation_loss(loss)
        # A plain attribute, not a submodule: the teacher belongs to no checkpoint.
        self.teacher = teacher
        if teacher is not None:
            self.bind_teacher(teacher)

    def bind_teacher(self, teacher: nn.Module) -> None:
        """The frozen model whose outputs the student must reproduce."""
        self.teacher = teacher.eval().requires_grad_(False)

    # ------------------------------------------------------------------ per batch
    def model_inputs(self, batch: Any) -> Any:
        if isinstance(batch, Mapping):  # tokenizer output; labels are not model inputs here
            return {k: v for k, v in batch.items() if k not in ("labels", "label")}
        if isinstance(batch, tuple | list):  # (inputs, targets) of vision data sets
            return batch[0]
        return batch

    def features(self, model: nn.Module, batch: Any) -> torch.Tensor:
        """The selected output of ``model`` on ``batch``."""
        inputs = self.model_inputs(batch)
        outputs = model(**inputs) if isinstance(inputs, Mapping) else model(inputs)
        key = "last_hidden_state" if self.output in self._DERIVED else self.output
        value = _output(outputs, key, model, self.output)
        if self.output == "cls":
            return value[:, 0]
        if self.output == "pooled" and value.dim() >= 3:
            weights = feature_mask(attention_mask(inputs), value)
            if weights is None:
                return value.mean(dim=1)
            return (value * weights).sum(1) / weights.sum(1).clamp_min(1.0)
        return value

    def forward(self, model: nn.Module, batch: Any) -> FeaturePair:
        if self.teacher is None:
            raise ConfigError(
                "task features compares the student with the teacher, but none is bound: pass "
                "teacher= to FeatureMatchingTask (or to the training module). It cannot be "
                "used to pretrain a model."
            )
        device = next(model.parameters()).device
        if next(self.teacher.parameters()).device != device:
            self.teacher.to(device)
        student = self.features(model, batch)
        with torch.no_grad():
            teacher = self.features(self.teacher, batch)
        mask = attention_mask(self.model_inputs(batch))
        return FeaturePair(student, teacher.to(student.dtype), mask)

    def loss(self, outputs: FeaturePair, batch: Any) -> torch.Tensor:
        return self._loss(outputs.student, outputs.teacher, outputs.mask)

    # ------------------------------------------------------------------ metrics
    def make_metrics(self) -> MetricCollection:
        sums = ("err_sq", "ref_sq", "cos_sum", "rows", "sim_corr_sum", "sim_batches")
        metrics = {name: SumMetric() for name in sums}
        return MetricCollection({**metrics, "loss": MeanMetric()})

    def update_metrics(
        self, metrics: MetricCollection, outputs: FeaturePair, batch: Any, loss: torch.Tensor
    ) -> None:
        s, t = outputs.student.detach().double(), outputs.teacher.detach().double()
        weights = feature_mask(outputs.mask, t)
        if weights is not None:  # token-major: every unpadded token is one row
            keep = weights.reshape(weights.shape[:2]).bool()
            s, t = s[keep], t[keep]
        rows_s, rows_t = s.flatten(1), t.flatten(1)
        metrics["err_sq"].update((rows_s - rows_t).pow(2).sum())
        metrics["ref_sq"].update(rows_t.pow(2).sum())
        metrics["cos_sum"].update(F.cosine_similarity(rows_s, rows_t, dim=1).sum())
        metrics["rows"].update(float(rows_t.shape[0]))
        embedding = outputs.teacher.dim() == 2 and rows_t.shape[0] >= 3  # per-sample vectors
        corr = similarity_correlation(rows_s, rows_t) if embedding else 0.0
        metrics["sim_corr_sum"].update(corr)  # updated either way: no empty-metric warnings
        metrics["sim_batches"].update(float(embedding))
        metrics["loss"].update(loss.detach(), weight=max(int(rows_t.shape[0]), 1))

    @staticmethod
    def finalize(values: dict[str, torch.Tensor]) -> dict[str, float]:
        ref, rows = float(values["ref_sq"]), float(values["rows"])
        out = {
            "loss": float(values["loss"]),
            "rel_err": (float(values["err_sq"]) / ref) ** 0.5 if ref > 0 else 0.0,
            "cosine": float(values["cos_sum"]) / rows if rows else 0.0,
        }
        if float(values["sim_batches"]) > 0:
            out["sim_corr"] = float(values["sim_corr_sum"]) / float(values["sim_batches"])
        return out


def similarity_correlation(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Pearson correlation of the pairwise cosine similarities of two sets of embeddings."""
    n = teacher.shape[0]
    upper = torch.triu_indices(n, n, offset=1, device=teacher.device)

    def pairwise(x: torch.Tensor) -> torch.Tensor:
        x = F.normalize(x, dim=1)
        return (x @ x.T)[upper[0], upper[1]]

    a, b = pairwise(student), pairwise(teacher)
    a, b = a - a.mean(), b - b.mean()
    denom = a.norm() * b.norm()
    return (a @ b) / denom if denom > 0 else torch.ones((), dtype=a.dtype, device=a.device)


def _output(outputs: Any, key: str, model: nn.Module, asked: str) -> torch.Tensor:
    """``outputs[key]`` of a ModelOutput / dict; a plain module's tensor output is the feature."""
    if isinstance(outputs, torch.Tensor):
        return outputs
    if isinstance(outputs, Mapping):
        value = outputs.get(key)
        available = [k for k, v in outputs.items() if isinstance(v, torch.Tensor)]
    elif isinstance(outputs, tuple | list):  # return_dict=False: the first tensor is the output
        value = next((v for v in outputs if isinstance(v, torch.Tensor)), None)
        available = ["<first element>"]
    else:
        value, available = getattr(outputs, key, None), []
    if not isinstance(value, torch.Tensor):
        raise TaskError(
            f"task features: {type(model).__name__} returned {type(outputs).__name__} without "
            f"{key!r} (asked for output={asked!r}); its tensor outputs are {available}. Set "
            f"task.output to one of them (derived: 'pooled', 'cls' from last_hidden_state)."
        )
    return value


# =========================================================================== from the config
def task_kind(cfg: Any) -> str:
    """The run's task: ``task.name`` unless ``auto``, else the data set's ``info.task``."""
    task_cfg = cfg.get("task") if hasattr(cfg, "get") else None
    name = str((task_cfg or {}).get("name", "auto"))
    if name == "auto":
        name = str(cfg.data.info.get("task", "classification"))
    return name


def build_task(cfg: Any) -> ClassificationTask | CausalLMTask | FeatureMatchingTask:
    """The task of a run config (``task=auto``: from the data set; ``task=features``)."""
    kind = task_kind(cfg)
    if kind == "classification":
        return ClassificationTask(cfg.data.info.num_classes)
    if kind == "causal_lm":
        return CausalLMTask()
    if kind == "features":
        return FeatureMatchingTask(
            output=str(cfg.task.get("output", "last_hidden_state")),
            loss=str(cfg.task.get("loss", "mse")),
        )
    raise ConfigError(
        f"unknown task {kind!r} (from task.name or data.info.task); choose one of {TASKS}."
    )
