"""Spill stores: per-sample block inputs kept in host memory or in raw files on disk."""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Sequence
from pathlib import Path

import torch

from tnexp.memory_bounded.config import HOST

__all__ = ["DiskStore", "MemoryStore"]


class MemoryStore:
    """Block inputs in host memory, one row per sample."""

    def __init__(self, rows: int) -> None:
        self.rows = rows
        self.data: torch.Tensor | None = None
        self.count = 0

    def append(self, batch: torch.Tensor) -> None:
        batch = batch.detach().to(HOST)
        if self.data is None:
            self.data = torch.empty((self.rows, *batch.shape[1:]), dtype=batch.dtype)
        self.data[self.count : self.count + batch.shape[0]] = batch
        self.count += batch.shape[0]

    def finish(self) -> None:
        if self.count != self.rows:
            raise RuntimeError(f"spill store got {self.count} rows, expected {self.rows}.")

    def gather(self, rows: torch.Tensor) -> torch.Tensor:
        return self.data[rows]

    def range(self, start: int, stop: int) -> torch.Tensor:
        # A copy: a block that modifies its input in place must not change the stored rows.
        return self.data[start:stop].clone()

    def delete(self) -> None:
        self.data = None


class DiskStore:
    """Block inputs in a raw file (rows of fixed size), read back with positioned reads.

    Plain reads instead of a memory map keep the pages in the OS cache rather than in the
    process, so the run's resident memory stays bounded by one batch.
    """

    def __init__(self, path: Path, rows: int) -> None:
        self.path = path
        self.rows = rows
        self.file = open(path, "w+b", buffering=0)  # noqa: SIM115 - closed in delete()
        self.shape: tuple[int, ...] | None = None
        self.dtype: torch.dtype | None = None
        self.row_bytes = 0
        self.count = 0

    def append(self, batch: torch.Tensor) -> None:
        batch = batch.detach().to(HOST).contiguous()
        if self.shape is None:
            self.shape, self.dtype = tuple(batch.shape[1:]), batch.dtype
            self.row_bytes = math.prod(self.shape) * batch.element_size()
        view = memoryview(batch.reshape(-1).view(torch.uint8).numpy())
        while view:
            view = view[self.file.write(view) :]
        self.count += batch.shape[0]

    def finish(self) -> None:
        if self.count != self.rows:
            raise RuntimeError(f"spill store got {self.count} rows, expected {self.rows}.")
        os.fsync(self.file.fileno())

    def _read(self, rows: Sequence[int]) -> torch.Tensor:
        out = torch.empty((len(rows), *self.shape), dtype=self.dtype)
        buffer = memoryview(out.reshape(-1).view(torch.uint8).numpy())
        # Consecutive rows are read with one call.
        j = 0
        while j < len(rows):
            k = j + 1
            while k < len(rows) and rows[k] == rows[k - 1] + 1:
                k += 1
            chunk = buffer[j * self.row_bytes : k * self.row_bytes]
            done = 0
            while done < len(chunk):
                got = os.preadv(self.file.fileno(), [chunk[done:]], rows[j] * self.row_bytes + done)
                if got <= 0:
                    raise RuntimeError(f"spill file {self.path} is shorter than expected.")
                done += got
            j = k
        return out

    def gather(self, rows: torch.Tensor) -> torch.Tensor:
        return self._read(rows.tolist())

    def range(self, start: int, stop: int) -> torch.Tensor:
        return self._read(list(range(start, stop)))

    def delete(self) -> None:
        self.file.close()
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()
