"""The `tnexp` command: a Hydra app over configs/ (configs/train.yaml) calling tnexp.run.

Errors the user can fix (the :class:`tnexp.errors.TnexpError` family, config errors found
by Hydra, an unwritable run directory) end the command with one message on stderr and exit
status 2: the message is the last thing printed. ``HYDRA_FULL_ERROR=1`` shows the full
traceback instead. Other exceptions are bugs and keep their traceback (exit status 1).
"""

from __future__ import annotations

import dataclasses
import os
import sys
import traceback

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.errors import CompactHydraException
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException

from tnexp.config import CONFIG_DIR, check_experiment_overrides
from tnexp.errors import TnexpError
from tnexp.restore import SavedRun, restore_config, saved_run

# The config a run folder was started with, read before Hydra rewrites its .hydra/
# (`hydra.run.dir=<dir> resume=auto`; tnexp/restore.py).
_SAVED_RUN: SavedRun | None = None
USAGE_ERROR = 2


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="train")
def _app(cfg: DictConfig) -> None:
    # Imported here, not for an import cycle (there is none) but for start-up time: the
    # stages pull in torch and Lightning (seconds), which `tnexp --help`, `--cfg job` and
    # a mistyped experiment name never need.
    from tnexp.console import setup_output
    from tnexp.run import run

    setup_output()
    if _SAVED_RUN is not None:
        cfg = restore_config(cfg, _SAVED_RUN, list(HydraConfig.get().overrides.task))
    run(cfg)


def _causes(err: BaseException) -> list[BaseException]:
    chain, seen = [], set()
    while err is not None and id(err) not in seen:
        chain.append(err)
        seen.add(id(err))
        err = err.__cause__ or err.__context__
    return chain


def user_error_message(err: BaseException) -> str | None:
    """The one-message form of a user-fixable error, or None for anything else (a bug)."""
    chain = _causes(err)
    for item in chain:
        if isinstance(item, TnexpError):
            return f"tnexp: error: {item}"
    if isinstance(err, CompactHydraException):  # unknown config group option, bad override
        # The search path listing Hydra appends is noise for the user: the options are above.
        message = str(err).split("Config search path:")[0].rstrip()
        return f"tnexp: error: {message}{_config_cause(chain[1:])}"
    denied = next((c for c in chain if isinstance(c, OSError)), None)
    before_task = not _reached_task(err)
    if denied is not None and before_task:
        # Hydra could not create the run directory or open its log file there (it reports
        # "Unable to configure handler 'file'"); name the real cause.
        return (
            f"tnexp: error: cannot write the run directory ({type(denied).__name__}: "
            f"{denied}). Choose a writable one with hydra.run.dir=<dir> (or fix its "
            "permissions)."
        )
    return None


def _config_cause(chain: list[BaseException]) -> str:
    """What OmegaConf found wrong behind a Hydra override error: the unknown key (with the
    keys its node has: the structured-config schemas of tnexp/schema.py list them all) or
    the value of the wrong type."""
    cause = next((c for c in chain if isinstance(c, OmegaConfBaseException)), None)
    if cause is None:
        return ""
    text = f"\n{(getattr(cause, 'msg', None) or str(cause)).splitlines()[0]}"
    full_key = getattr(cause, "full_key", None)
    if full_key:
        text += f" (key: {full_key})"
    if isinstance(cause, ConfigKeyError):
        parent = getattr(cause, "parent_node", None)
        schema = getattr(cause, "object_type", None)
        if OmegaConf.is_dict(parent):
            known = [str(k) for k in parent]
        elif dataclasses.is_dataclass(schema):
            known = [f.name for f in dataclasses.fields(schema)]
        else:
            known = []
        if known:
            text += f"; the keys there: {', '.join(known)}"
    return text


def _reached_task(err: BaseException) -> bool:
    """Whether the exception passed through the task function (else Hydra's own setup)."""
    tb = err.__traceback__
    while tb is not None:
        if tb.tb_frame.f_code is _app.__wrapped__.__code__:
            return True
        tb = tb.tb_next
    return False


def main() -> None:
    global _SAVED_RUN
    # W&B stays offline unless the user asks otherwise; HF libraries must not try the hub.
    os.environ.setdefault("WANDB_SILENT", "true")
    try:
        check_experiment_overrides(sys.argv[1:], CONFIG_DIR)
        _SAVED_RUN = saved_run(sys.argv[1:])
    except ValueError as err:  # before Hydra starts: no run folder for a run that cannot run
        print(f"tnexp: error: {err}", file=sys.stderr)
        sys.exit(USAGE_ERROR)
    full = os.environ.get("HYDRA_FULL_ERROR") == "1"
    # Hydra re-raises instead of printing its own trimmed traceback; we report below.
    os.environ["HYDRA_FULL_ERROR"] = "1"
    try:
        _app()
    except Exception as err:
        if full:
            raise
        message = user_error_message(err)
        if message is None:
            traceback.print_exc()
            print(
                "tnexp: unexpected error (a bug?); the traceback is above.",
                file=sys.stderr,
            )
            sys.exit(1)
        sys.stderr.flush()
        print(message, file=sys.stderr)
        sys.exit(USAGE_ERROR)
    finally:
        _SAVED_RUN = None  # belongs to this command only (main() may run again in-process)


if __name__ == "__main__":
    main()
