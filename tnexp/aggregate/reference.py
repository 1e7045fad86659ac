"""The paper's published figures (``experiments/paper_reference.yaml``) as a queryable object."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from tnexp.aggregate.common import DEFAULT_REFERENCE, AggregateError, same


class Reference:
    """The paper's published figures (``experiments/paper_reference.yaml``)."""

    def __init__(self, data: dict[str, Any], source: Path | None = None) -> None:
        self.data = data
        self.source = source
        self.classification: dict[str, Any] = data.get("classification") or {}
        self.language_model: dict[str, Any] = data.get("language_model") or {}
        self.views: dict[str, Any] = data.get("tables") or {}

    def has_dataset(self, name: str | None) -> bool:
        return name is not None and name in self.classification

    def label(self, name: str) -> str:
        return str(self.classification.get(name, {}).get("label", name))

    def full_samples(self, name: str) -> int | None:
        return self.classification.get(name, {}).get("full_train_samples")

    def paper_samples(self, name: str | None, samples_key: Any) -> Any:
        """Our samples key ("full" or a count) as the paper's training-sample count."""
        if name is None:
            return None
        if samples_key == "full":
            return self.full_samples(name)
        return samples_key

    def row(self, name: str | None, cr: float | None, method: str, samples: Any) -> dict | None:
        if name is None:
            return None
        for entry in self.classification.get(name, {}).get("rows", []):
            if (
                same(entry.get("cr"), cr)
                and entry.get("method") == method
                and entry.get("samples") == samples
            ):
                return entry
        return None

    def rows(self, name: str) -> list[dict[str, Any]]:
        return list(self.classification.get(name, {}).get("rows", []))

    def dense(self, name: str | None) -> dict[str, Any]:
        return dict(self.classification.get(name, {}).get("dense") or {}) if name else {}

    def hyperparameters(self, name: str | None, phase: str) -> dict[str, Any]:
        if name is None:
            return {}
        return dict(self.classification.get(name, {}).get("hyperparameters", {}).get(phase, {}))

    def sweep(self, name: str | None, phase: str, param: str) -> dict[float, float]:
        """Appendix B curve: {value: top-1} for a data set, phase and parameter."""
        if name is None:
            return {}
        raw = self.classification.get(name, {}).get("sweeps", {}).get(phase, {}).get(param, {})
        return {float(k): float(v) for k, v in (raw or {}).items()}

    def lm(self, key: str = "gpt2_xl") -> dict[str, Any]:
        return dict(self.language_model.get(key) or {})


def load_reference(path: str | Path | None = None) -> Reference:
    """Read the paper figures (default: ``experiments/paper_reference.yaml``)."""
    p = Path(path) if path is not None else DEFAULT_REFERENCE
    if not p.is_file():
        raise AggregateError(
            f"paper reference file {p} not found; pass --reference <paper_reference.yaml> "
            "(the repository's experiments/paper_reference.yaml)."
        )
    try:
        data = yaml.safe_load(p.read_text())
    except yaml.YAMLError as err:
        raise AggregateError(f"paper reference file {p} is not valid YAML: {err}") from None
    if not isinstance(data, dict):
        raise AggregateError(f"paper reference file {p} must hold a mapping at the top level.")
    return Reference(data, p)
