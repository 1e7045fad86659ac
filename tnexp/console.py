"""What `tnexp` prints: one place for terminal output (Lightning's chatter, tables, progress).

* Lightning prints its hardware lines and a product tip for every ``Trainer`` (seven
  times in the quickstart), through its own stderr handler *and* Hydra's stdout handler.
  :func:`setup_output` sends them through Hydra's logging only, keeps each hardware line
  once and drops the tips.
* Rich wraps tables and progress bars at 80 columns when stdout is not a terminal (a log
  file, CI): :func:`console` is as wide as the terminal, or unlimited when there is none,
  and the ``auto`` progress bar is Rich on a terminal and one log line per epoch otherwise.
"""

from __future__ import annotations

import contextlib
import logging
import sys
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import lightning as L

__all__ = ["EpochLog", "console", "progress_callbacks", "setup_output", "work_bar"]

log = logging.getLogger("tnexp")

# Printed by Lightning for every Trainer; worth reading once per process.
_ONCE_PREFIXES = ("GPU available", "TPU available", "HPU available", "LOCAL_RANK")
# Advertisements and bookkeeping that say nothing about this run.
_DROP_PREFIXES = (
    "💡 Tip",
    "Tip:",
    "Loading `train_dataloader` to estimate",
    "`Trainer.fit` stopped",
)
_LIGHTNING_LOGGERS = ("lightning.pytorch", "lightning.fabric", "lightning")
# Width when stdout is not a terminal: wide enough that no table row ever wraps.
_UNWRAPPED_WIDTH = 1000


class _LightningFilter(logging.Filter):
    def __init__(self) -> None:
        super().__init__()
        self.seen: set[str] = set()

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage().lstrip()
        if message.startswith(_DROP_PREFIXES):
            return False
        if message.startswith(_ONCE_PREFIXES):
            if message in self.seen:
                return False
            self.seen.add(message)
        return True


_FILTER = _LightningFilter()


def setup_output() -> None:
    """Route Lightning's messages through the app's logging once; silence known noise.

    Called once per `tnexp` command; the hardware lines show once per command.
    """
    _FILTER.seen.clear()
    for name in _LIGHTNING_LOGGERS:
        logger = logging.getLogger(name)
        # Lightning adds a stderr handler when imported before logging is configured; with
        # Hydra's handlers on the root logger that doubles every line (stdout and stderr).
        for handler in list(logger.handlers):
            if type(handler) is logging.StreamHandler:
                logger.removeHandler(handler)
        logger.propagate = True
    # A filter acts only on the logger that emits the record: attach it to the emitters.
    for name in ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero"):
        logger = logging.getLogger(name)
        if _FILTER not in logger.filters:
            logger.addFilter(_FILTER)
    # The teacher inside a distillation module is in eval mode on purpose.
    warnings.filterwarnings("ignore", message=r".*module\(s\) in eval mode.*")
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\).*")


def is_terminal() -> bool:
    return sys.stdout.isatty()


def console() -> Any:
    """A Rich console for tables: the terminal's width, or unwrapped in logs and pipes."""
    from rich.console import Console

    return Console(width=None if is_terminal() else _UNWRAPPED_WIDTH)


class EpochLog(L.Callback):
    """One log line per validation in place of a progress bar (stdout is not a terminal)."""

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        # Validation runs inside the training epoch, before its epoch means exist: show the
        # validation metrics and the last training step's loss.
        shown = {
            k: float(v)
            for k, v in trainer.callback_metrics.items()
            if k.startswith("val/") or k == "train/loss_step"
        }
        metrics = ", ".join(f"{k} {v:.4g}" for k, v in sorted(shown.items()))
        log.info("epoch %d/%d: %s", trainer.current_epoch + 1, trainer.max_epochs, metrics)


def progress_callbacks(kind: str) -> list[L.Callback]:
    """Callbacks for ``callbacks.progress_bar``: auto | rich | tqdm | none."""
    from lightning.pytorch.callbacks import RichProgressBar, TQDMProgressBar

    if kind not in ("auto", "rich", "tqdm", "none"):
        raise ValueError(f"callbacks.progress_bar must be auto, rich, tqdm or none, got {kind!r}.")
    if kind == "auto":
        kind = "rich" if is_terminal() else "log"
    if kind == "rich":
        return [RichProgressBar(leave=False)]
    if kind == "tqdm":
        return [TQDMProgressBar()]
    if kind == "log":
        return [EpochLog()]
    return []


@contextlib.contextmanager
def work_bar(enabled: bool, total: int, description: str) -> Iterator[Callable[[], None]]:
    """A tqdm bar over ``total`` steps of work outside a Trainer (calibration, analyses).

    Yields the function that advances it by one step; a no-op when ``enabled`` is false.
    The bar is closed even when the work raises.
    """
    if not enabled:
        yield lambda: None
        return
    from tqdm.auto import tqdm

    bar = tqdm(total=total, desc=description, leave=False)
    try:
        yield lambda: bar.update(1)
    finally:
        bar.close()
