"""Text corpora for causal LMs, tokenised and packed into fixed-length blocks.

Sources:

* ``stdlib`` — English help texts shipped with Python (``pydoc_data.topics``, ~460 kB):
  real text that is always available offline;
* ``file`` — a local ``.txt`` (one document) or ``.jsonl`` (one document per line, in a
  ``text`` field);
* ``openwebtext`` — N random documents of ``Skylion007/openwebtext`` through
  ``datasets.load_dataset`` (the paper: 25k sequences of 1024 tokens);
* ``hf`` — any ``datasets.load_dataset`` path (also ``json`` with local ``data_files``).

Documents are tokenised with the model's tokenizer and joined with its eos token into one
token stream. The stream is split into train (head) and validation (tail) *before*
packing, so no block contains tokens of both; each part is then cut into contiguous
blocks of ``seq_len`` tokens (the remainder is dropped).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from tnexp.data.base import SplitDataModule
from tnexp.errors import InputFileError, TnexpError

log = logging.getLogger(__name__)

__all__ = [
    "OPENWEBTEXT",
    "DataNotAvailableError",
    "TextBlocks",
    "TextDataModule",
    "pack_blocks",
    "stdlib_documents",
]

SOURCES = ("stdlib", "file", "openwebtext", "hf")
OPENWEBTEXT = "Skylion007/openwebtext"
# datasets' packaged builders read local files; their errors are not "offline" errors.
_LOCAL_BUILDERS = {"json", "csv", "text", "parquet", "arrow"}
_TOKENIZE_CHUNK = 256  # documents per tokenizer call: batched calls are much faster


class DataNotAvailableError(TnexpError, OSError):
    """A dataset is not in the local cache and could not be downloaded."""


def stdlib_documents() -> list[str]:
    """Python's pydoc help topics, one document per topic, in sorted key order."""
    from pydoc_data.topics import topics

    return [topics[key] for key in sorted(topics)]


def pack_blocks(tokens: torch.Tensor, seq_len: int, limit: int | None = None) -> torch.Tensor:
    """Cut a 1-D token stream into ``(n, seq_len)`` contiguous blocks, dropping the rest."""
    n = tokens.numel() // seq_len
    if limit is not None:
        n = min(n, int(limit))
    return tokens[: n * seq_len].reshape(n, seq_len)


class TextBlocks(Dataset):
    """Packed token blocks served as ``{"input_ids", "attention_mask"}`` (int64)."""

    def __init__(self, blocks: torch.Tensor):
        self.blocks = blocks  # int32 storage halves memory for 25k x 1024 blocks

    def __len__(self) -> int:
        return self.blocks.shape[0]

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        ids = self.blocks[index].long()
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


class TextDataModule(SplitDataModule):
    """Packed causal-LM blocks from a text source (see the module docstring).

    Args:
        source: ``stdlib``, ``file``, ``openwebtext`` or ``hf``.
        tokenizer: model name/path resolved like the model (``gpt2``, ``smollm2-135m``, a
            local directory) or a tokenizer object.
        tokenizer_gguf_file: GGUF file name for tokenizers stored in a GGUF directory.
        path: the ``.txt`` / ``.jsonl`` file for ``source=file``.
        text_field: field holding the text in ``.jsonl`` lines and HF datasets.
        seq_len: tokens per block.
        num_sequences: at most this many training blocks (None: all available; required
            for streamed corpora unless ``num_documents`` is set).
        num_val_sequences: at most this many validation blocks (None: all in the tail).
        val_fraction: fraction of the token stream (its tail) used for validation.
        num_documents: for ``openwebtext``/``hf``: take this many random documents.
            None: read random documents until the requested blocks are filled.
        hf_path, hf_name, hf_split, hf_kwargs: ``datasets.load_dataset`` arguments for
            ``source=hf`` (``openwebtext`` sets ``hf_path`` to ``Skylion007/openwebtext``).
        streaming: stream the HF dataset (no full download; documents are shuffled with a
            ``shuffle_buffer``-document buffer) or download it and shuffle exactly.
        max_context: the model's context length; ``seq_len`` above it is an error.
        batch_size, num_workers: DataLoader settings.
        seed: seeds document sampling and the training-loader shuffle.
    """

    name: str = "text"

    def __init__(
        self,
        source: str = "stdlib",
        tokenizer: Any = "gpt2",
        *,
        tokenizer_gguf_file: str | None = None,
        path: str | None = None,
        text_field: str = "text",
        seq_len: int = 1024,
        num_sequences: int | None = None,
        num_val_sequences: int | None = None,
        val_fraction: float = 0.1,
        num_documents: int | None = None,
        hf_path: str | None = None,
        hf_name: str | None = None,
        hf_split: str = "train",
        hf_kwargs: dict[str, Any] | None = None,
        streaming: bool = True,
        shuffle_buffer: int = 10_000,
        max_context: int | None = None,
        batch_size: int = 8,
        num_workers: int = 0,
        seed: int = 0,
    ) -> None:
        super().__init__()
        # A tokenizer object is not a hyperparameter worth logging (nor serialisable).
        self.save_hyperparameters(ignore=None if isinstance(tokenizer, str) else ["tokenizer"])
        if source not in SOURCES:
            raise ValueError(f"source must be one of {SOURCES}, got {source!r}")
        if seq_len < 2:
            raise ValueError(f"seq_len must be >= 2 (next-token prediction), got {seq_len}")
        if max_context is not None and seq_len > int(max_context):
            raise ValueError(
                f"seq_len={seq_len} exceeds the model's context of {max_context} positions; "
                f"use a seq_len <= {max_context}."
            )
        if not 0.0 < val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
        for key, value in (
            ("num_sequences", num_sequences),
            ("num_val_sequences", num_val_sequences),
            ("num_documents", num_documents),
        ):
            if value is not None and int(value) < 1:
                raise ValueError(f"{key} must be >= 1 or None, got {value}")
        if source == "openwebtext":
            hf_path = hf_path or OPENWEBTEXT
        if source in ("openwebtext", "hf"):
            if not hf_path:
                raise ValueError("source=hf needs hf_path (a datasets.load_dataset path).")
            if num_sequences is None and num_documents is None:
                # Otherwise the whole corpus (8M documents for OpenWebText) is tokenised.
                raise ValueError(
                    f"source={source} needs num_sequences or num_documents "
                    "(the paper: num_sequences=25000, seq_len=1024)."
                )
        self.source = source
        self.tokenizer_arg = tokenizer
        self.tokenizer_gguf_file = tokenizer_gguf_file
        self.path = path
        self.text_field = text_field
        self.seq_len = int(seq_len)
        self.num_sequences = None if num_sequences is None else int(num_sequences)
        self.num_val_sequences = None if num_val_sequences is None else int(num_val_sequences)
        self.val_fraction = float(val_fraction)
        self.num_documents = None if num_documents is None else int(num_documents)
        self.hf_path = hf_path
        self.hf_name = hf_name
        self.hf_split = hf_split
        self.hf_kwargs = dict(hf_kwargs or {})
        self.streaming = bool(streaming)
        self.shuffle_buffer = int(shuffle_buffer)
        self.max_context = max_context
        self.batch_size = int(batch_size)
        self.num_workers = int(num_workers)
        self.seed = int(seed)

        self.tokenizer: Any = None if isinstance(tokenizer, str) else tokenizer
        self.train_tokens: torch.Tensor | None = None  # 1-D streams, before packing
        self.val_tokens: torch.Tensor | None = None
        self.train_set: TextBlocks | None = None
        self.val_set: TextBlocks | None = None
        self.num_documents_read = 0

    # ------------------------------------------------------------------ identity
    @property
    def tokenizer_name(self) -> str:
        if isinstance(self.tokenizer_arg, str):
            return self.tokenizer_arg
        return str(getattr(self.tokenizer_arg, "name_or_path", type(self.tokenizer_arg).__name__))

    def identity(self) -> dict[str, Any]:
        """Everything that determines the blocks this module yields (for cache checks)."""
        ident: dict[str, Any] = {
            "name": f"{self.name}:{self.source}",
            "source": self.source,
            "tokenizer": self.tokenizer_name,
            "tokenizer_gguf_file": self.tokenizer_gguf_file,
            "seq_len": self.seq_len,
            "num_sequences": self.num_sequences,
            "num_val_sequences": self.num_val_sequences,
            "seed": self.seed,
            "split": {"method": "stream_tail", "val_fraction": self.val_fraction},
            "separator": "eos",
        }
        if self.source == "stdlib":
            # pydoc topics change between Python releases.
            ident["python"] = f"{sys.version_info.major}.{sys.version_info.minor}"
        elif self.source == "file":
            ident["path"] = str(self.path)
            ident["text_field"] = self.text_field
            if self.path and Path(self.path).is_file():
                ident["sha256"] = hashlib.sha256(Path(self.path).read_bytes()).hexdigest()
        else:
            ident["hf"] = {
                "path": self.hf_path,
                "name": self.hf_name,
                "split": self.hf_split,
                "kwargs": self.hf_kwargs,
                "text_field": self.text_field,
                "streaming": self.streaming,
                "shuffle_buffer": self.shuffle_buffer if self.streaming else None,
                "num_documents": self.num_documents,
            }
        return ident

    # ------------------------------------------------------------------ documents
    def _documents(self) -> Iterator[str]:
        if self.source == "stdlib":
            yield from stdlib_documents()
        elif self.source == "file":
            yield from self._file_documents()
        else:
            yield from self._hf_documents()

    def _file_documents(self) -> Iterator[str]:
        if not self.path:
            raise ValueError("source=file needs data.path (a .txt or .jsonl file).")
        path = Path(self.path).expanduser()
        if not path.is_file():
            raise InputFileError(
                f"text file {path} does not exist; set data.path to an existing .txt or .jsonl "
                "file."
            )
        if path.suffix == ".txt":
            yield path.read_text(encoding="utf-8")
        elif path.suffix == ".jsonl":
            with path.open(encoding="utf-8") as f:
                for lineno, line in enumerate(f, 1):
                    if not line.strip():
                        continue
                    try:
                        record = json.loads(line)
                        yield record[self.text_field]
                    except (json.JSONDecodeError, KeyError, TypeError):
                        raise ValueError(
                            f"{path}:{lineno}: expected a JSON object with a "
                            f"{self.text_field!r} field."
                        ) from None
        else:
            raise ValueError(f"text file must end in .txt or .jsonl, got {path.name}")

    def _unavailable(self, err: Exception) -> DataNotAvailableError:
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        return DataNotAvailableError(
            f"dataset {self.hf_path!r} is not available offline: it is not in the local "
            f"datasets cache and could not be downloaded ({reason}). Set HF_HOME (or "
            "HF_DATASETS_CACHE) to a cache that has it, use data=text_file with a local "
            ".txt/.jsonl, or run where the hub is reachable."
        )

    def _hf_documents(self) -> Iterator[str]:
        import datasets

        local = self.hf_path in _LOCAL_BUILDERS or Path(str(self.hf_path)).exists()
        try:
            ds = datasets.load_dataset(
                self.hf_path,
                self.hf_name,
                split=self.hf_split,
                streaming=self.streaming,
                **self.hf_kwargs,
            )
            if self.streaming:
                ds = ds.shuffle(seed=self.seed, buffer_size=self.shuffle_buffer)
            else:
                ds = ds.shuffle(seed=self.seed)
            for record in ds:  # streamed data can also fail here, mid-way
                yield record[self.text_field]
        except OSError as err:  # ConnectionError, hub errors, missing cache entries
            if local:
                raise
            raise self._unavailable(err) from None

    # ------------------------------------------------------------------ tokenising
    def _load_tokenizer(self) -> Any:
        if self.tokenizer is None:
            from tnexp.models.hf import load_tokenizer

            self.tokenizer = load_tokenizer(self.tokenizer_arg, gguf_file=self.tokenizer_gguf_file)
        return self.tokenizer

    def _target_tokens(self) -> int | None:
        """Stream length that fills the requested blocks (None: read every document)."""
        if self.source in ("stdlib", "file") or self.num_documents is not None:
            return None
        need = math.ceil(self.num_sequences * self.seq_len / (1.0 - self.val_fraction))
        if self.num_val_sequences is not None:
            need = max(need, math.ceil(self.num_val_sequences * self.seq_len / self.val_fraction))
        return need + 2 * self.seq_len  # slack: each part drops a partial block

    def _token_stream(self) -> torch.Tensor:
        tokenizer = self._load_tokenizer()
        eos = tokenizer.eos_token_id
        sep = np.asarray([] if eos is None else [eos], dtype=np.int32)
        target = self._target_tokens()
        parts: list[np.ndarray] = []
        total = docs = 0
        chunk: list[str] = []

        def flush() -> None:
            nonlocal total
            # verbose=False: documents longer than model_max_length are fine here.
            encoded = tokenizer(chunk, add_special_tokens=False, verbose=False)["input_ids"]
            for ids in encoded:
                parts.append(np.asarray(ids, dtype=np.int32))
                parts.append(sep)
                total += len(ids) + sep.size
            chunk.clear()

        for text in self._documents():
            if not text or not text.strip():
                continue
            chunk.append(text)
            docs += 1
            if len(chunk) >= _TOKENIZE_CHUNK:
                flush()
                if target is not None and total >= target:
                    break
            if self.num_documents is not None and docs >= self.num_documents:
                break
        if chunk:
            flush()
        self.num_documents_read = docs
        if not parts:
            raise ValueError(f"source {self.source!r} yielded no text.")
        stream = torch.from_numpy(np.concatenate(parts))
        if target is not None and stream.numel() > target:
            stream = stream[:target]  # the same stream however large the last chunk was
        return stream

    # ------------------------------------------------------------------ setup / loaders
    def setup(self, stage: str | None = None) -> None:
        """Read, tokenise, split and pack (idempotent)."""
        if self.train_set is not None:
            return
        stream = self._token_stream()
        cut = int(stream.numel() * (1.0 - self.val_fraction))
        # Split before packing: no block holds both training and validation tokens.
        self.train_tokens, self.val_tokens = stream[:cut], stream[cut:]
        train = pack_blocks(self.train_tokens, self.seq_len, self.num_sequences)
        val = pack_blocks(self.val_tokens, self.seq_len, self.num_val_sequences)
        if train.shape[0] == 0 or val.shape[0] == 0:
            raise ValueError(
                f"{stream.numel()} tokens from source {self.source!r} give {train.shape[0]} "
                f"training and {val.shape[0]} validation blocks of seq_len={self.seq_len}; "
                "use a smaller seq_len or val_fraction, or more text."
            )
        for want, got, what in (
            (self.num_sequences, train.shape[0], "training"),
            (self.num_val_sequences, val.shape[0], "validation"),
        ):
            if want is not None and got < want:
                log.warning("only %d of %d requested %s blocks available", got, want, what)
        self.train_set, self.val_set = TextBlocks(train), TextBlocks(val)
        log.info(
            "text %s: %d documents, %d tokens -> %d train / %d val blocks of %d tokens",
            self.source,
            self.num_documents_read,
            stream.numel(),
            len(self.train_set),
            len(self.val_set),
            self.seq_len,
        )
