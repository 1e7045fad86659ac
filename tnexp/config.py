"""Config-level helpers of the Hydra app: resolvers, schemas and experiment-name checks.

Importing this module registers the resolvers and the structured-config schemas
(``tnexp/__init__.py`` does), so configs composed by ``tnexp``, by ``hydra.compose`` in
tests or by notebooks resolve the same way.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from tnexp.errors import ConfigError, InputFileError
from tnexp.schema import register_schemas

__all__ = [
    "CONFIG_DIR",
    "UnknownExperimentError",
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

# The structured-config schemas the YAML files extend (``/schema/<name>``, tnexp/schema.py).
register_schemas()


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
        raise InputFileError(
            f"layer profile {path} not found: run the profiling experiment first (e.g. "
            "`uv run tnexp experiment=paper/cifar10/profile`), or list the layers to keep "
            "dense yourself with tensorize.exclude=[...]."
        )
    try:
        entries = json.loads(path.read_text())
        ranked = sorted(entries, key=lambda e: (-float(e["drop"]), e["name"]))
    except (ValueError, KeyError, TypeError) as err:
        raise ConfigError(
            f"layer profile {path} is not a profile written by tnexp ({err}); rerun the "
            "profiling experiment."
        ) from None
    if k < 0 or k > len(ranked):
        raise ConfigError(f"cannot exclude {k} layers: the profile {path} has {len(ranked)}.")
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


def add(*terms: Any) -> int:
    """The sum of integer terms: ``${tnexp.sum:${method.local_epochs},1}`` (configs/smoke)."""
    return sum(int(x) for x in terms)


if not OmegaConf.has_resolver("tnexp.sum"):
    OmegaConf.register_new_resolver("tnexp.sum", add)


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
    comes before Hydra creates an output folder for a run that cannot start. The former
    ``smoke=true`` switch is refused too, naming its replacement ``debug=smoke``.
    """
    import difflib

    known = experiment_names(config_dir)
    for arg in args:
        key, sep, value = arg.lstrip("+~").partition("=")
        if sep and key == "smoke":
            raise ConfigError(
                f"{arg}: smoke runs are the config group option debug=smoke now "
                "(configs/debug/smoke.yaml); leave it out for the full run."
            )
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
