"""One run per run directory: a lock file holding the owner's PID and host.

Two runs writing one directory overwrite each other's checkpoints, CSV logs and
results.json. :func:`run_directory_lock` creates ``<dir>/.tnexp-run.lock`` exclusively;
a second run is refused with the PID and host holding it. A lock whose process is dead
(same host) is stale: it is reported and taken over, so a run killed with ``kill -9`` can
be resumed (``resume=auto``) without manual cleanup.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback

from tnexp.errors import RunDirectoryError

__all__ = [
    "LOCK_FILE",
    "RunDirectoryGuard",
    "check_run_directory",
    "pid_alive",
    "run_directory_lock",
]

LOCK_FILE = ".tnexp-run.lock"
log = logging.getLogger("tnexp")


def pid_alive(pid: int) -> bool:
    """Whether a process with this PID exists on this host."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by another user
        return True
    return True


def _read(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}  # half-written by a killed process: treated as stale below


def _create(path: Path, owner: dict[str, Any]) -> bool:
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        return False
    with os.fdopen(fd, "w") as handle:
        json.dump(owner, handle)
    return True


def _in_use_error(directory: Path, path: Path, held: dict[str, Any]) -> RunDirectoryError:
    pid, held_host = held.get("pid"), held.get("host")
    where = "this host" if held_host == socket.gethostname() else f"host {held_host}"
    return RunDirectoryError(
        f"run directory {directory} is in use by another tnexp run (PID {pid} on {where}, "
        f"lock {path}). Wait for it to finish, or use another directory "
        f"(hydra.run.dir=<dir>). If that run is dead (e.g. on another host), delete the "
        f"lock: rm {path}"
    )


def _is_stale(held: dict[str, Any]) -> bool:
    pid = held.get("pid")
    return held.get("host") == socket.gethostname() and isinstance(pid, int) and not pid_alive(pid)


def check_run_directory(directory: str | Path) -> None:
    """Refuse (without locking) a directory that a live run holds; used before Hydra
    writes its ``.hydra/`` files and log into it, so the live run's files stay intact."""
    directory = Path(directory)
    path = directory / LOCK_FILE
    if path.is_file():
        held = _read(path)
        if held and not _is_stale(held):
            raise _in_use_error(directory, path, held)


class RunDirectoryGuard(Callback):
    """Hydra callback (configs/hydra/default.yaml): checks the run directory's lock in
    ``on_run_start``, i.e. before Hydra saves its config files and opens its log there.

    Subclassing Hydra's ``Callback`` gives the other hooks as no-ops (without it Hydra warns
    that ``on_job_start`` is missing on every run)."""

    def on_run_start(self, config: Any, **kwargs: Any) -> None:
        from omegaconf import OmegaConf

        run_dir = OmegaConf.select(config, "hydra.run.dir", default=None)
        if not run_dir:
            return
        try:
            check_run_directory(str(run_dir))
        except RunDirectoryError as err:
            # Hydra turns exceptions in callbacks into warnings and carries on, so this is
            # the one place that ends the command itself (as tnexp.cli would: exit 2).
            import sys

            print(f"tnexp: error: {err}", file=sys.stderr)
            raise SystemExit(2) from None


@contextlib.contextmanager
def run_directory_lock(directory: str | Path) -> Iterator[Path]:
    """Hold ``<directory>/.tnexp-run.lock`` for the duration of a run (created if needed)."""
    directory = Path(directory)
    try:
        directory.mkdir(parents=True, exist_ok=True)
        probe = directory / f".tnexp-write-test-{os.getpid()}"
        probe.write_text("")
        probe.unlink()
    except OSError as err:
        raise RunDirectoryError(
            f"cannot write the run directory {directory} ({type(err).__name__}: {err}). Choose "
            "a writable one with hydra.run.dir=<dir> (or fix its permissions)."
        ) from None
    path = directory / LOCK_FILE
    host = socket.gethostname()
    owner = {"pid": os.getpid(), "host": host, "started": time.time()}
    for _ in range(3):  # a stale lock is removed, then created again (racing another run)
        if _create(path, owner):
            break
        held = _read(path)
        pid = held.get("pid")
        if _is_stale(held):
            log.warning(
                "run directory %s: stale lock of PID %s on %s (that process is dead); taking it "
                "over",
                directory,
                pid,
                host,
            )
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
            continue
        if not held:
            raise RunDirectoryError(
                f"{path} exists but is unreadable; if no run is using {directory}, delete it "
                f"(rm {path}) and start again."
            )
        raise _in_use_error(directory, path, held)
    else:
        raise RunDirectoryError(f"could not take the lock {path}; retry the run.")
    try:
        yield path
    finally:
        if _read(path).get("pid") == os.getpid():
            with contextlib.suppress(OSError):
                path.unlink()
