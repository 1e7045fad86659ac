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
