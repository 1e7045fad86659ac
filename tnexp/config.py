"""Config-level helpers of the Hydra app: OmegaConf resolvers and the ``smoke`` switch.

Importing this module registers the resolvers (``tnexp/__init__.py`` does), so configs
composed by ``tnexp``, by ``hydra.compose`` in tests or by notebooks resolve the same way.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf, open_dict

__all__ = ["SMOKE_GROUPS", "apply_smoke", "plain", "sensitive_layers"]

PROFILE_FILE = "profile.json"


def sensitive_layers(profile: str, k: int | str = 4) -> list[str]:
    """The ``k`` layers with the largest accuracy drop in a profiling run (appendix B.1).

    ``profile`` is the output directory of ``tnexp method=profile`` (or its profile.json).
    Used in configs as ``tensorize.exclude: ${tnexp.sensitive_layers:<dir>,4}`` so that the
    paper experiments exclude exactly what the profiling run measured.
    """
    k = int(k)
    path = Path(profile)
    if path.is_dir():
        path = path / PROFILE_FILE
    if not path.is_file():
        raise FileNotFoundError(
            f"layer profile {path} not found: run the profiling experiment first (e.g. "
            "`uv run tnexp experiment=paper/cifar10/profile`), or list the layers to keep "
            "dense yourself with tensorize.exclude=[...]."
        )
    try:
        entries = json.loads(path.read_text())
        ranked = sorted(entries, key=lambda e: (-float(e["drop"]), e["name"]))
    except (ValueError, KeyError, TypeError) as err:
        raise ValueError(
            f"layer profile {path} is not a profile written by tnexp ({err}); rerun the "
            "profiling experiment."
        ) from None
    if k < 0 or k > len(ranked):
        raise ValueError(f"cannot exclude {k} layers: the profile {path} has {len(ranked)}.")
    return [e["name"] for e in ranked[:k]]


if not OmegaConf.has_resolver("tnexp.sensitive_layers"):
    OmegaConf.register_new_resolver("tnexp.sensitive_layers", sensitive_layers)


# ------------------------------------------------------------------ smoke runs
# Config groups whose node may carry a ``smoke:`` block. With ``smoke=true`` the block is
# merged into its node (a block with its own ``_target_`` replaces the node: e.g. GPT-2 XL
# becomes a tiny random GPT-2 with the same module names); the blocks are always removed
# before anything is instantiated. What each data set or model shrinks to lives beside it.
SMOKE_GROUPS = ("data", "model", "tensorize", "method", "trainer", "eval")


def apply_smoke(cfg: DictConfig) -> DictConfig:
    """Apply (``cfg.smoke`` true) or drop the ``smoke:`` blocks of ``cfg``, in place."""
    enabled = cfg.get("smoke", False)
    if not isinstance(enabled, bool):
        raise ValueError(f"smoke must be true or false, got {enabled!r} (e.g. smoke=true).")
    with open_dict(cfg):
        for group in SMOKE_GROUPS:
            node = cfg.get(group)
            if not isinstance(node, DictConfig) or "smoke" not in node:
                continue
            block = node.smoke
            del node["smoke"]
            if not enabled or block is None:
                continue
            if "_target_" in block:
                cfg[group] = block
            else:
                cfg[group] = OmegaConf.merge(node, block)
        if enabled and "local_epochs" in cfg.method:
            # A hybrid smoke run must still reach its global phase.
            cfg.trainer.max_epochs = max(
                int(cfg.trainer.max_epochs or 1), int(cfg.method.local_epochs) + 1
            )
    return cfg


def plain(node: Any) -> Any:
    """Plain Python values of a config node (resolved), e.g. for dataclass constructors."""
    if OmegaConf.is_config(node):
        return OmegaConf.to_container(node, resolve=True)
    if isinstance(node, tuple):
        return list(node)
    return node
