"""Replaying the normal mode's training batches: the schedule of sample indices, batch sizes."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset

from tnexp.memory_bounded.config import BlockwiseError

__all__ = ["batch_counts", "batch_len", "batches_per_epoch", "has_tensor", "replay_schedule"]


class _Indices(Dataset):
    def __init__(self, size: int) -> None:
        self.size = size

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index: int) -> int:
        return index


def _collate_indices(items: list[int]) -> torch.Tensor:
    return torch.tensor(items, dtype=torch.long)


def batches_per_epoch(num_batches: int, limit: int | float | None) -> int:
    # Lightning's limit_train_batches: an int caps the batches, a float takes a fraction.
    if limit is None or (isinstance(limit, float) and limit == 1.0):
        return num_batches
    if isinstance(limit, float):
        count = int(num_batches * limit)
        if count == 0:
            raise BlockwiseError(
                f"limit_train_batches={limit} of {num_batches} batches is 0 batches; raise it."
            )
        return count
    return min(num_batches, int(limit))


def replay_schedule(
    loader: DataLoader, epochs: int, limit: int | float | None = None, max_steps: int | None = None
) -> list[list[torch.Tensor]]:
    """The sample indices of every training batch, per epoch, in the order ``loader`` yields.

    The loader's own batch sampler and generator are iterated through a DataLoader of
    indices with the same worker settings, which draws from the generator exactly as
    Lightning's loop iterating ``loader`` does, so the batches equal the normal mode's.
    ``loader``'s generator is advanced in the process.
    """
    if isinstance(loader.dataset, IterableDataset):
        raise BlockwiseError(
            "the memory-bounded mode needs a map-style training dataset (indexable, with a "
            "length) to store and replay per-sample block inputs; got an IterableDataset."
        )
    indices = DataLoader(
        _Indices(len(loader.dataset)),
        batch_sampler=loader.batch_sampler,
        num_workers=loader.num_workers,
        collate_fn=_collate_indices,
        generator=loader.generator,
        persistent_workers=loader.persistent_workers,
        worker_init_fn=loader.worker_init_fn,
        multiprocessing_context=loader.multiprocessing_context,
    )
    per_epoch = batches_per_epoch(len(indices), limit)
    schedule: list[list[torch.Tensor]] = []
    steps = 0
    for _ in range(epochs):
        take = per_epoch if max_steps is None else min(per_epoch, max_steps - steps)
        if take <= 0:
            break
        # Take exactly the batches Lightning takes (it stops by length): pulling once more
        # would exhaust the RandomSampler, which then draws an extra permutation from the
        # generator and shifts every later epoch.
        iterator = iter(indices)
        schedule.append([next(iterator) for _ in range(take)])
        del iterator
        steps += take
    return schedule


def has_tensor(value: Any) -> bool:
    if isinstance(value, torch.Tensor):
        return True
    if isinstance(value, Mapping):
        return any(has_tensor(v) for v in value.values())
    if isinstance(value, tuple | list):
        return any(has_tensor(v) for v in value)
    return False


def batch_counts(loader: DataLoader) -> Iterator[int]:
    n, size = len(loader.dataset), loader.batch_size or 1
    for start in range(0, n, size):
        yield min(size, n - start)


def batch_len(batch: Any) -> int:
    if isinstance(batch, torch.Tensor):
        return batch.shape[0]
    if isinstance(batch, Mapping):
        return batch_len(next(iter(batch.values())))
    if isinstance(batch, tuple | list):
        return batch_len(batch[0])
    raise BlockwiseError(f"cannot tell the batch size of a {type(batch).__name__} batch.")
