"""Resume a run from its folder alone: restore the run's own saved config.

``tnexp hydra.run.dir=<run dir> resume=auto`` must continue *that* run, whatever it was
started with (``tensorize.cr=0.7``, ``method=global``, an experiment...). Hydra composes
the command line from scratch and then overwrites ``<run dir>/.hydra/config.yaml``, so
the saved config is read before Hydra starts (:func:`saved_run`) and, inside the app,
replaces the freshly composed one (:func:`restore_config`). Command-line overrides that
change what the run *is* (model, data, tensorization, method...) are refused, naming the
keys; overrides of how it runs (epochs, devices, loggers, paths) are applied.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf, open_dict

from tnexp.errors import ConfigError
from tnexp.schema import is_schema_default

__all__ = ["ResumeConfigError", "SavedRun", "restore_config", "save_config", "saved_run"]

# Top-level keys (or groups) a resumed run may change: they say how it runs, not what.
RESUMABLE_KEYS = ("trainer", "callbacks", "logger", "paths", "resume", "data.num_workers")


class ResumeConfigError(ConfigError):
    """The command line of a resume contradicts the config saved in the run folder."""


@dataclass(frozen=True)
class SavedRun:
    """The config a run folder was started with, and the overrides that produced it."""

    run_dir: Path
    config: DictConfig
    overrides: list[str]
    source: Path  # .hydra/config.yaml, or results.json of a finished run


def save_config(cfg: DictConfig, run_dir: Path, overrides: list[str]) -> None:
    """Save a stage's config the way Hydra saves a run's (``.hydra/``), if none is there.

    For stages that are not Hydra runs of their own (the quickstart's): an interrupted
    stage can then be resumed from its folder like any run.
    """
    saved = run_dir / ".hydra"
    if (saved / "config.yaml").is_file():
        return
    saved.mkdir(parents=True, exist_ok=True)
    (saved / "config.yaml").write_text(OmegaConf.to_yaml(cfg))
    (saved / "overrides.yaml").write_text(OmegaConf.to_yaml(list(overrides)))


def _arg_value(args: list[str], key: str) -> str | None:
    value = None
    for arg in args:
        k, sep, v = arg.lstrip("+").partition("=")
        if sep and k == key:
            value = v.strip().strip("'\"")
    return value


def saved_run(args: list[str]) -> SavedRun | None:
    """The saved config of ``hydra.run.dir=<dir> resume=auto`` (None: nothing to restore).

    Reads ``<dir>/.hydra/config.yaml`` (every ``tnexp`` run), else the ``config`` of
    ``<dir>/results.json`` (stages run by the quickstart or from Python). Call it before
    Hydra starts: Hydra rewrites ``.hydra/`` with the new command line.
    """
    if "-m" in args or "--multirun" in args or _arg_value(args, "resume") != "auto":
        return None
    run_dir = _arg_value(args, "hydra.run.dir")
    if not run_dir:
        return None
    run_dir_path = Path(run_dir)
    hydra_config = run_dir_path / ".hydra" / "config.yaml"
    results = run_dir_path / "results.json"
    if hydra_config.is_file():
        overrides_file = hydra_config.with_name("overrides.yaml")
        overrides = OmegaConf.load(overrides_file) if overrides_file.is_file() else []
        config = OmegaConf.load(hydra_config)
        return SavedRun(run_dir_path, config, [str(o) for o in overrides], hydra_config)
    if results.is_file():
        try:
            config = OmegaConf.create(json.loads(results.read_text())["config"])
        except (ValueError, KeyError, TypeError) as err:
            raise ResumeConfigError(
                f"cannot read the config saved in {results} ({err}); resume with the run's "
                "full original command line instead."
            ) from None
        return SavedRun(run_dir_path, config, [], results)
    return None  # a fresh folder: resume=auto starts the run


def _key(override: str) -> str:
    return override.lstrip("+~").partition("=")[0]


def _resumable(key: str) -> bool:
    return any(key == k or key.startswith(f"{k}.") for k in RESUMABLE_KEYS)


def _has_key(cfg: DictConfig, key: str) -> bool:
    node: Any = cfg
    for part in key.split("."):
        if not isinstance(node, DictConfig) or part not in node:
            return False
        node = node._get_node(part)  # the node itself: no interpolation is resolved
    return True


def _value(cfg: DictConfig, key: str) -> Any:
    node = OmegaConf.select(cfg, key, default=None, throw_on_resolution_failure=False)
    return OmegaConf.to_container(node, resolve=False) if OmegaConf.is_config(node) else node


def _differences(a: Any, b: Any, prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two plain configs, resumable keys aside."""
    if isinstance(a, dict) and isinstance(b, dict):
        found = []
        for k in sorted(set(a) | set(b), key=str):
            key = f"{prefix}{k}"
            if _resumable(key):
                continue
            if (k in a) != (k in b) and is_schema_default(key, a[k] if k in a else b[k]):
                continue  # placed (or moved) by a schema since: its default applied anyway
            found += _differences(a.get(k), b.get(k), f"{key}.")
        return found
    return [] if a == b else [prefix.rstrip(".")]


def restore_config(cfg: DictConfig, saved: SavedRun, task_overrides: list[str]) -> DictConfig:
    """The saved config, with the resumable overrides of this command line applied.

    Raises :class:`ResumeConfigError` naming every override that would change the run.
    Rewrites ``.hydra/config.yaml`` and ``overrides.yaml`` with the restored config, so the
    folder can be resumed again.
    """
    conflicts = []
    applied = []
    for override in task_overrides:
        key = _key(override)
        if _resumable(key):
            applied.append(override)
            continue
        if not _has_key(cfg, key) and not _has_key(saved.config, key):
            # A group without a node of its own (experiment=...): compare what it changed.
            changed = _differences(
                OmegaConf.to_container(cfg, resolve=False),
                OmegaConf.to_container(saved.config, resolve=False),
            )
            if changed:
                conflicts.append(f"{override} (changes {', '.join(changed[:6])})")
            continue
        given, before = _value(cfg, key), _value(saved.config, key)
        if given != before:
            conflicts.append(f"{key} (saved: {before!r}, given: {given!r})")
    if conflicts:
        raise ResumeConfigError(
            f"resume=auto continues the run saved in {saved.run_dir} ({saved.source.name}), "
            f"but the command line changes {'; '.join(conflicts)}. Drop these overrides "
            "(the folder's config is used), or start a new run in another folder."
        )
    restored = saved.config.copy()
    with open_dict(restored):
        for override in applied:
            key = _key(override)
            if override.startswith("~"):
                parent, _, leaf = key.rpartition(".")
                node = OmegaConf.select(restored, parent) if parent else restored
                if node is not None and leaf in node:
                    del node[leaf]
                continue
            OmegaConf.update(restored, key, OmegaConf.select(cfg, key), merge=False)
    OmegaConf.set_struct(restored, True)  # typos in later code fail like in a fresh run
    saved_dir = saved.run_dir / ".hydra"
    if saved_dir.is_dir():
        kept = [o for o in saved.overrides if _key(o) not in {_key(a) for a in applied}]
        (saved_dir / "config.yaml").write_text(OmegaConf.to_yaml(restored))
        (saved_dir / "overrides.yaml").write_text(OmegaConf.to_yaml([*kept, *applied]))
    return restored
