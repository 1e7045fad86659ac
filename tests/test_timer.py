"""OptimizationTimer: what is and is not billed as optimisation time, best tracking, resume."""

from __future__ import annotations

import json
import time

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader, Dataset

from tnexp.callbacks import OptimizationTimer

STEP_SLEEP = 0.03  # inside training_step, outside capture: must be counted
CAPTURE_SLEEP = 0.25  # inside the fake feature capture: must be excluded
DATA_SLEEP = 0.06  # per sample in Dataset.__getitem__: must be excluded
BATCH = 4
N_TRAIN = 8  # -> 2 steps per epoch
VAL_CURVE = [0.5, 0.9, 0.6, 0.95]  # val/top1 by epoch; best in the middle for 3 epochs


class SlowDataset(Dataset):
    def __init__(self, n: int, sleep: float) -> None:
        self.x = torch.randn(n, 3, generator=torch.Generator().manual_seed(0))
        self.sleep = sleep

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        time.sleep(self.sleep)
        return self.x[i], torch.tensor(i % 2)


class ToyModule(L.LightningModule):
    def __init__(self, step_sleep: float, capture_sleep: float, data_sleep: float) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(3, 2)
        self.step_sleep, self.capture_sleep, self.data_sleep = step_sleep, capture_sleep, data_sleep
        self.feature_capture_seconds = 0.0

    def _capture(self) -> None:
        # Stand-in for a teacher forward with hooks; the module bills itself.
        t0 = time.perf_counter()
        time.sleep(self.capture_sleep)
        self.feature_capture_seconds += time.perf_counter() - t0

    def training_step(self, batch, batch_idx):
        x, y = batch
        self._capture()
        time.sleep(self.step_sleep)
        return torch.nn.functional.cross_entropy(self.layer(x), y)

    def validation_step(self, batch, batch_idx):
        value = VAL_CURVE[self.current_epoch]
        self.log("val/top1", value, on_epoch=True, batch_size=len(batch[0]))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)

    def train_dataloader(self):
        return DataLoader(SlowDataset(N_TRAIN, self.data_sleep), batch_size=BATCH)

    def val_dataloader(self):
        return DataLoader(SlowDataset(BATCH, 0.0), batch_size=BATCH)


def _trainer(max_epochs: int, callbacks, **kwargs) -> L.Trainer:
    defaults = dict(
        accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False,
    )  # fmt: skip
    defaults.update(kwargs)
    return L.Trainer(max_epochs=max_epochs, callbacks=callbacks, **defaults)


@pytest.fixture(scope="module")
def fitted() -> tuple[OptimizationTimer, L.Trainer, float]:
    timer = OptimizationTimer(monitor="val/top1", mode="max")
    trainer = _trainer(3, [timer])
    t0 = time.perf_counter()
    trainer.fit(ToyModule(STEP_SLEEP, CAPTURE_SLEEP, DATA_SLEEP))
    return timer, trainer, time.perf_counter() - t0


def test_optimization_time_excludes_capture_and_data(fitted):
    timer, trainer, elapsed = fitted
    steps = 3 * N_TRAIN // BATCH
    assert timer.num_steps_timed == steps == trainer.global_step
    # The in-step sleep is counted ...
    assert timer.optimization_s >= steps * STEP_SLEEP
    # ... but neither the capture sleep nor the data-loading sleep (each >= 0.24 s/step).
    overhead_allowance = 0.1 * steps
    assert timer.optimization_s < steps * STEP_SLEEP + overhead_allowance
    assert timer.feature_capture_s == pytest.approx(steps * CAPTURE_SLEEP, rel=0.2)
    # Wall time covers everything, including the excluded sleeps.
    min_wall = steps * (STEP_SLEEP + CAPTURE_SLEEP + BATCH * DATA_SLEEP)
    assert min_wall <= timer.wall_s <= elapsed
    # Logged values (on_step) are the running totals.
    logged = float(trainer.callback_metrics["time/optimization_s"])
    assert logged == pytest.approx(timer.optimization_s)
    assert "time/wall_s" in trainer.callback_metrics


def test_best_and_history_consistent(fitted):
    timer, _, _ = fitted
    hist = timer.history
    assert [h["epoch"] for h in hist] == [0, 1, 2]  # no sanity-check entry
    assert [h["step"] for h in hist] == [2, 4, 6]
    assert [h["value"] for h in hist] == pytest.approx(VAL_CURVE[:3])
    times = [h["optimization_s"] for h in hist]
    assert times == sorted(times) and times[-1] <= timer.optimization_s
    best = max(hist, key=lambda h: h["value"])
    assert timer.best_value == pytest.approx(0.9) == pytest.approx(best["value"])
    assert timer.time_to_best_s == best["optimization_s"]
    assert timer.step_at_best == best["step"] == 4
    assert timer.epoch_at_best == 1
    assert timer.time_to_best_s < timer.optimization_s


def test_summary_json_and_state_roundtrip(fitted):
    timer, _, _ = fitted
    summary = timer.summary()
    assert json.loads(json.dumps(summary)) == summary
    clone = OptimizationTimer()
    clone.load_state_dict(timer.state_dict())
    assert clone.summary() == summary
    assert clone.wall_s == timer.wall_s  # frozen after fit end


def test_min_mode_and_missing_metric():
    timer = OptimizationTimer(monitor="val/top1", mode="min")
    missing = OptimizationTimer(monitor="val/nope")
    _trainer(2, [timer, missing], num_sanity_val_steps=0).fit(ToyModule(0.0, 0.0, 0.0))
    assert timer.best_value == pytest.approx(VAL_CURVE[0])
    assert timer.step_at_best == 2
    assert timer.state_key != missing.state_key
    assert [h["value"] for h in missing.history] == [None, None]
    assert missing.best_value is None and missing.time_to_best_s is None
    with pytest.raises(ValueError, match="mode"):
        OptimizationTimer(mode="maximum")


def test_resume_from_checkpoint(tmp_path):
    first = OptimizationTimer()
    trainer = _trainer(2, [first], num_sanity_val_steps=0, default_root_dir=tmp_path)
    module = ToyModule(0.01, 0.05, 0.0)
    trainer.fit(module)
    ckpt = tmp_path / "two_epochs.ckpt"
    trainer.save_checkpoint(ckpt)
    saved = first.state_dict()

    second = OptimizationTimer()
    resumed = _trainer(4, [second], num_sanity_val_steps=0, default_root_dir=tmp_path)
    resumed.fit(ToyModule(0.01, 0.05, 0.0), ckpt_path=ckpt)
    assert second.history[:2] == saved["history"]
    assert [h["epoch"] for h in second.history] == [0, 1, 2, 3]
    assert second.num_steps_timed == 8
    assert second.optimization_s >= saved["optimization_s"] + 4 * 0.01
    assert second.wall_s > saved["wall_s"]
    assert second.history[2]["optimization_s"] > saved["optimization_s"]
    # Best was at epoch 1 (0.9) before the resume; epoch 3 (0.95) beats it afterwards.
    assert saved["step_at_best"] == 4
    assert second.best_value == pytest.approx(0.95) and second.step_at_best == 8
