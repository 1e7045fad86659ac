"""Config-level helpers of the Hydra app: OmegaConf resolvers and the ``smoke`` switch.

Importing this module registers the resolvers (``tnexp/__init__.py`` does), so configs
composed by ``tnexp``, by ``hydra.compose`` in tests or by notebooks resolve the same way.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf, open_dict

from tnexp.errors import ConfigError

__all__ = [
    "CONFIG_DIR",
    "SMOKE_GROUPS",
    "UnknownExperimentError",
    "apply_smoke",
    "check_experiment_overrides",
    "experiment_names",
    "plain",
    "sensitive_layers",
]

PROFILE_FILE = "profile.json"

# The Hydra config tree (configs/train.yaml). Here, at the bottom of the package, so that
# library modules and tests find it without importing the entry point (tnexp.cli).
CONFIG_DIR = str(Path(__file__).resolve().parent.parent / "configs")
if not Path(CONFIG_DIR).is_dir():  # installed as a wheel: configs ship inside the package
    CONFIG_DIR = str(Path(__file__).resolve().parent / "configs")


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


def unique_path(*parts: Any) -> str:
    """``a/b`` from path parts, each repeated part once (``quickstart/quickstart`` -> one).

    The default run folder is ``outputs/<experiment>/<method>/<time>``; when the
    experiment is named after its method (every plain run) that would say it twice.
    """
    kept: list[str] = []
    for part in (str(p) for p in parts if p not in (None, "")):
        if part not in kept:
            kept.append(part)
    return "/".join(kept)


if not OmegaConf.has_resolver("tnexp.unique_path"):
    OmegaConf.register_new_resolver("tnexp.unique_path", unique_path)


# ------------------------------------------------------------------ smoke runs
# Config groups whose node may carry a ``smoke:`` block. With ``smoke=true`` the block is
# merged into its node (a block with its own ``_target_`` replaces the node: e.g. GPT-2 XL
# becomes a tiny random GPT-2 with the same module names); the blocks are always removed
# before anything is instantiated. What each data set or model shrinks to lives beside it.
SMOKE_GROUPS = ("data", "model", "tensorize", "method", "trainer", "eval")


def command_line_overrides() -> list[str]:
    """The ``key=value`` overrides of the running Hydra app (empty outside one)."""
    try:
        from hydra.core.hydra_config import HydraConfig

        if HydraConfig.initialized():
            return [str(o) for o in HydraConfig.get().overrides.task]
    except (ImportError, ValueError):
        pass
    return []


def _override_keys(overrides: list[str]) -> list[str]:
    """Dotted config keys set by overrides (group choices such as ``model=gpt2`` excluded)."""
    keys = []
    for item in overrides:
        key = item.split("=", 1)[0].lstrip("+~")
        if "=" in item and "." in key and "@" not in key and key.split(".")[0] in SMOKE_GROUPS:
            keys.append(key)
    return keys


def apply_smoke(cfg: DictConfig, overrides: list[str] | None = None) -> DictConfig:
    """Apply (``cfg.smoke`` true) or drop the ``smoke:`` blocks of ``cfg``, in place.

    Values set on the command line (``overrides``; by default the running Hydra app's) win
    over the smoke blocks: ``smoke=true trainer.max_epochs=3`` runs 3 epochs. An override
    of a key that the smoke model no longer has (a smoke block can swap the model) is
    refused with a clear error instead of being dropped.
    """
    enabled = cfg.get("smoke", False)
    if not isinstance(enabled, bool):
        raise ConfigError(f"smoke must be true or false, got {enabled!r} (e.g. smoke=true).")
    keys = _override_keys(command_line_overrides() if overrides is None else overrides)
    explicit = {k: OmegaConf.select(cfg, k, default=None) for k in keys} if enabled else {}
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
        if enabled and "local_epochs" in cfg.method and "trainer.max_epochs" not in explicit:
            # A hybrid smoke run must still reach its global phase.
            cfg.trainer.max_epochs = max(
                int(cfg.trainer.max_epochs or 1), int(cfg.method.local_epochs) + 1
            )
        for key, value in explicit.items():
            parent, _, leaf = key.rpartition(".")
            node = OmegaConf.select(cfg, parent, default=None)
            if not isinstance(node, DictConfig) or leaf not in node:
                target = OmegaConf.select(cfg, f"{key.split('.')[0]}._target_", default=None)
                raise ConfigError(
                    f"smoke=true replaces {key.split('.')[0]} by a small stand-in ({target}) "
                    f"that has no {key}, so the command-line override {key}={value} cannot "
                    f"apply. Drop the override, or run without smoke=true."
                )
            OmegaConf.update(cfg, key, value, merge=False)
    return cfg


def plain(node: Any) -> Any:
    """Plain Python values of a config node (resolved), e.g. for dataclass constructors."""
    if OmegaConf.is_config(node):
        return OmegaConf.to_container(node, resolve=True)
    if isinstance(node, tuple):
        return list(node)
    return node


# ------------------------------------------------------------------ experiment names
class UnknownExperimentError(ConfigError):
    """An ``experiment=<name>`` on the command line names no file under configs/experiment."""


def experiment_names(config_dir: str | Path) -> list[str]:
    """Every experiment selectable with ``experiment=<name>`` (paths without ``.yaml``)."""
    root = Path(config_dir) / "experiment"
    return sorted(p.relative_to(root).with_suffix("").as_posix() for p in root.rglob("*.yaml"))


def _override_values(value: str) -> list[str] | None:
    """The experiment names of one override value; None for a glob (matched by Hydra)."""
    value = value.strip()
    if value.startswith("glob("):
        return None
    for sweep in ("choice(", "range("):
        if value.startswith(sweep) and value.endswith(")"):
            value = value[len(sweep) : -1]
    names = [v.strip().strip("'\"") for v in value.split(",")]
    return [n for n in names if n and n.lower() != "null"]


def check_experiment_overrides(args: list[str], config_dir: str | Path) -> None:
    """Refuse ``experiment=<name>`` arguments that name no experiment config.

    Hydra's own error lists all ~60 experiments; this one names the closest few, and it
    comes before Hydra creates an output folder for a run that cannot start.
    """
    import difflib

    known = experiment_names(config_dir)
    for arg in args:
        key, sep, value = arg.lstrip("+~").partition("=")
        if not sep or key != "experiment":
            continue
        for name in _override_values(value) or []:
            name = name.removesuffix(".yaml")
            if name in known:
                continue
            close = difflib.get_close_matches(name, known, n=5, cutoff=0.5)
            tops = ", ".join(sorted({k.split("/")[0] for k in known}))
            hint = f" Did you mean: {', '.join(close)}?" if close else f" Known: {tops}/..."
            raise UnknownExperimentError(
                f"unknown experiment {name!r}: no file configs/experiment/{name}.yaml.{hint}"
                " `tnexp --help` lists the config groups; docs/experiments.md the experiments."
            )
