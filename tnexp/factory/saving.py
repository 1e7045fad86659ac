"""Saving a tensorized model and rebuilding it from the saved folder."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from tnexp.errors import IntegrityError
from tnexp.factory.build import tensorize
from tnexp.factory.report import TensorizeReport
from tnexp.integrity import atomic_write_json, checksum_matches, file_checksum
from tnexp.tn.errors import TensorizationError

SPEC_FILE = "tensorize.json"
WEIGHTS_FILE = "model.safetensors"


def save_tensorized(
    model: nn.Module,
    report: TensorizeReport,
    directory: str | Path,
    *,
    base_config: Mapping[str, Any] | None = None,
) -> Path:
    """Write ``model.safetensors`` and ``tensorize.json`` (report + how to build the base).

    ``base_config`` is a Hydra-style ``{"_target_": ..., ...}`` that builds the dense
    architecture; with it, :func:`load_tensorized` needs nothing but the directory.
    """
    import os

    from safetensors.torch import save_model

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    weights = directory / WEIGHTS_FILE
    tmp = directory / f".{WEIGHTS_FILE}.{os.getpid()}.tmp"
    save_model(model, str(tmp))  # handles tied weights
    os.replace(tmp, weights)  # never a half-written weights file under the real name
    payload = {
        "report": report.to_dict(),
        "base_config": dict(base_config or {}) or None,
        # Written last: the JSON is the commit marker and carries the weights' checksum.
        "weights_checksum": file_checksum(weights),
    }
    atomic_write_json(directory / SPEC_FILE, payload, default=_json_default)
    return directory


def _json_default(obj: Any) -> Any:
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, tuple | set):
        return list(obj)
    raise TypeError(f"not JSON-serialisable: {type(obj)}")


def load_tensorized(
    directory: str | Path, base: nn.Module | None = None
) -> tuple[nn.Module, TensorizeReport]:
    """Rebuild a saved tensorized model: build (or take) the dense base, re-tensorize with
    the recorded shapes (random init, no SVD), then load the weights strictly.

    Nothing in the folder is executed: the base is built only by one of tnexp's own model
    builders (:mod:`tnexp.models.builders`), and the weights are safetensors whose checksum
    (recorded in ``tensorize.json``) is verified first.
    """
    from safetensors.torch import load_model

    directory = Path(directory)
    spec_path, weights_path = directory / SPEC_FILE, directory / WEIGHTS_FILE
    resave = "re-save the model (or copy the folder again from a good source)"
    for path in (spec_path, weights_path):
        if not path.is_file():
            raise FileNotFoundError(
                f"{path} is missing: {directory} is not a saved tensorized model "
                "(expected files written by tnexp.factory.save_tensorized)."
            )
    try:
        payload = json.loads(spec_path.read_text())
        report = TensorizeReport.from_dict(payload["report"])
    except (ValueError, KeyError, TypeError, AttributeError) as err:
        raise IntegrityError(
            f"{spec_path} is not a readable tensorize.json ({type(err).__name__}: {err}); {resave}."
        ) from None
    recorded = payload.get("weights_checksum")
    if recorded is not None and not checksum_matches(weights_path, recorded):
        raise IntegrityError(
            f"{weights_path} fails the checksum recorded in {spec_path}: the weights were "
            f"damaged or replaced after saving; {resave}."
        )
    if base is None:
        if not payload.get("base_config"):
            raise TensorizationError(
                f"{spec_path} records no base_config; pass the dense architecture as base=."
            )
        from tnexp.models.builders import build_registered

        if not isinstance(payload["base_config"], Mapping):
            raise IntegrityError(f"{spec_path}: base_config is not a mapping; {resave}.")
        base = build_registered(payload["base_config"], source=str(spec_path))
    with torch.random.fork_rng(devices=[]):
        student, _ = tensorize(base, report.resolved_spec())
    try:
        load_model(student, str(weights_path), strict=True)
    except RuntimeError as err:
        raise TensorizationError(
            f"the weights in {weights_path} do not fit the rebuilt model ({err}). Was the "
            "base architecture the one used when saving?"
        ) from None
    except Exception as err:  # safetensors' own error types: truncated or corrupt header
        raise IntegrityError(
            f"{weights_path} is not a readable safetensors file ({type(err).__name__}: "
            f"{err}); {resave}."
        ) from None
    return student, report
