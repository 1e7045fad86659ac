"""What the model is trained and measured on: one place for task losses and metrics.

Every LightningModule in tnexp (pretrain, local, global, hybrid) asks its task how to
turn a batch into model inputs, what the task loss is and which metrics to report, so the
modules stay agnostic of classification vs language modelling.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics import MeanMetric, MetricCollection
from torchmetrics.classification import MulticlassAccuracy


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
        return model(**self.model_inputs(batch)).logits

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
