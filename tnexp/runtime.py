"""The thread policy: how many torch threads (and DataLoader workers) a run may use.

One place for the concern, applied at the start of every stage (``prepare_stage``), test
session (``tests/conftest.py``) and launcher job. Why it matters: torch's intra-op pool
waits for *all* its threads at the end of every parallel region, so when another process
holds one of the cores, every small op waits a scheduler time slice. On a 2-core machine
loaded by other processes a ResNet step took 5-8x longer with torch's default 2 threads
than with 1 (docs/benchmarks.md, "Threads").

``runtime.threads`` (configs/runtime/default.yaml):

* an int N: exactly N torch threads (intra-op and, once per process, inter-op);
* ``auto`` with ``OMP_NUM_THREADS`` set: that number (the user's explicit choice);
* ``auto``: the cores this process may use (``os.sched_getaffinity``; SLURM's
  ``SLURM_CPUS_PER_TASK`` in a submitit job) divided by the jobs a joblib multirun runs at
  once (and by the ranks of a CPU DDP run), less the cores other processes keep busy
  (sampled for 0.25 s when the stage starts), and 1 thread once the first training step
  shows the work is tiny (below ``runtime.tiny_step_gflop``, :class:`ThreadPolicyCallback`).

The choice is logged once, recorded under ``runtime`` in every ``results.json``, and a
loaded machine is reported in one line.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import os
import time
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf, open_dict

from tnexp.errors import ConfigError
from tnexp.schema import RuntimeSettings

__all__ = [
    "ThreadChoice",
    "ThreadPolicyCallback",
    "apply_thread_policy",
    "choose_threads",
    "current_choice",
    "others_busy_cores",
    "parse_threads",
    "refine_for_work",
    "reset_state",
    "runtime_record",
    "usable_cores",
]

log = logging.getLogger("tnexp")

# Per training step (forward + backward, as counted by torch's FlopCounterMode), below
# which one thread should be as fast as two on an idle 2-core CPU. An estimate: the
# crossover could not be measured on an idle machine yet (docs/benchmarks.md, "Threads").
DEFAULT_TINY_STEP_GFLOP = RuntimeSettings.tiny_step_gflop  # configs: runtime.tiny_step_gflop
# A core counts as taken when other processes use at least half of it.
_TAKEN = 0.5
# How long the stage-start sample of the other processes' CPU use lasts.
_SAMPLE_S = 0.25


@dataclasses.dataclass(frozen=True)
class ThreadChoice:
    """What the policy decided, and from what (recorded in results.json as ``runtime``)."""

    threads: int
    source: str  # "runtime.threads" | "OMP_NUM_THREADS" | "auto"
    cores: int  # cores this process may use
    jobs: int = 1  # processes sharing those cores (joblib n_jobs x CPU DDP ranks)
    others_busy: float = 0.0  # cores other processes used when the stage started
    load_1min: float | None = None  # os.getloadavg()[0] at that moment
    step_gflop: float | None = None  # measured work of one training step (auto only)
    data_workers: int | None = None  # DataLoader workers after the policy
    reason: str = ""

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["interop_threads"] = torch.get_num_interop_threads()
        return out


def usable_cores() -> int:
    """Cores this process may run on (its CPU affinity; all CPUs where that is unknown)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def parse_threads(value: Any, key: str = "runtime.threads") -> int | str:
    """``"auto"`` or a positive int; anything else is an error naming ``key`` and the fix."""
    if isinstance(value, str) and value.strip().lower() == "auto":
        return "auto"
    if not isinstance(value, bool):
        try:
            n = int(value)
            if n == float(value) and n >= 1:
                return n
        except (TypeError, ValueError):
            pass
    raise ConfigError(
        f"{key} must be 'auto' or a whole number of threads >= 1, got {value!r}; e.g. "
        f"{key}=auto (the policy) or {key}=1."
    )


def _env_threads(env: dict[str, str] | os._Environ) -> int | None:
    raw = env.get("OMP_NUM_THREADS")
    if raw is None or not raw.strip():
        return None
    try:
        # OpenMP allows a list ("4,2") for nested levels; the first is the outer pool.
        return int(parse_threads(raw.split(",")[0], "OMP_NUM_THREADS"))
    except ValueError:
        raise ConfigError(
            f"OMP_NUM_THREADS={raw!r} is not a positive whole number; unset it or set e.g. "
            "OMP_NUM_THREADS=1."
        ) from None


def choose_threads(
    setting: Any = "auto",
    *,
    cores: int,
    jobs: int = 1,
    others_busy: float = 0.0,
    step_gflop: float | None = None,
    tiny_step_gflop: float = DEFAULT_TINY_STEP_GFLOP,
    env: dict[str, str] | None = None,
    load_1min: float | None = None,
) -> ThreadChoice:
    """The policy itself (pure: every input is an argument, nothing is read or set).

    ``setting`` is ``runtime.threads``; ``cores`` the usable cores; ``jobs`` how many jobs
    share them; ``others_busy`` the cores other processes keep busy; ``step_gflop`` the
    measured work of one training step (None: not measured yet); ``env`` the environment
    (for ``OMP_NUM_THREADS``; default: ``os.environ``).
    """
    env = os.environ if env is None else env
    setting = parse_threads(setting)
    facts = {
        "cores": cores,
        "jobs": jobs,
        "others_busy": round(others_busy, 2),
        "load_1min": load_1min,
        "step_gflop": step_gflop,
    }
    if setting != "auto":
        return ThreadChoice(setting, "runtime.threads", reason="explicit setting", **facts)
    from_env = _env_threads(env)
    if from_env is not None:
        return ThreadChoice(from_env, "OMP_NUM_THREADS", reason="set in the environment", **facts)
    per_job = max(1, cores // max(1, jobs))
    reasons = [f"{cores} usable cores" + (f" / {jobs} concurrent jobs" if jobs > 1 else "")]
    threads = per_job
    # Free cores: a core that others keep at least half busy is not ours to wait for.
    free = max(1, math.floor(cores - others_busy + (1 - _TAKEN)))
    if free < threads:
        threads = free
        reasons.append(f"other processes busy on {others_busy:.1f} cores")
    if step_gflop is not None and step_gflop < tiny_step_gflop and threads > 1:
        threads = 1
        reasons.append(f"tiny step ({step_gflop:.3g} < {tiny_step_gflop:g} GFLOP)")
    return ThreadChoice(threads, "auto", reason=", ".join(reasons), **facts)


def _cpu_times(cpus: set[int]) -> tuple[float, float] | None:
    """(busy, total) jiffies summed over ``cpus`` from /proc/stat; None off Linux."""
    try:
        with open("/proc/stat") as f:
            lines = f.read().splitlines()
    except OSError:
        return None
    busy = total = 0.0
    for line in lines:
        name, *fields = line.split()
        if not name.startswith("cpu") or name == "cpu" or int(name[3:]) not in cpus:
            continue
        values = [float(v) for v in fields[:8]]  # user nice system idle iowait irq softirq steal
        total += sum(values)
        busy += sum(values) - values[3] - values[4]
    return (busy, total) if total > 0 else None


def others_busy_cores(sample_s: float = _SAMPLE_S) -> float:
    """Cores that *other* processes keep busy, sampled now over ``sample_s`` seconds.

    Counts non-idle CPU time on this process's cores in /proc/stat, less this process's
    own CPU time in the same window. Falls back to the 1-minute load average where
    /proc/stat is missing.
    """
    try:
        cpus = os.sched_getaffinity(0)
    except AttributeError:
        cpus = set(range(os.cpu_count() or 1))
    before, own_before = _cpu_times(cpus), time.process_time()
    if before is None:
        return _load_share()
    time.sleep(sample_s)
    after, own_after = _cpu_times(cpus), time.process_time()
    if after is None or after[1] <= before[1]:
        return _load_share()
    share = (after[0] - before[0]) / (after[1] - before[1])
    wall_cores = share * len(cpus)
    own = (own_after - own_before) / sample_s
    return max(0.0, wall_cores - own)


def _load_1min() -> float | None:
    try:
        return float(os.getloadavg()[0])
    except (AttributeError, OSError):
        return None


def _load_share() -> float:
    """The 1-minute load average scaled to the cores this process may use."""
    load = _load_1min()
    if load is None:
        return 0.0
    return load * usable_cores() / (os.cpu_count() or usable_cores())


# ------------------------------------------------------------------ applying the policy
_STATE: dict[str, Any] = {"choice": None, "logged": set(), "load_checked": False}


def current_choice() -> ThreadChoice | None:
    """The last choice applied in this process (None before the first)."""
    return _STATE["choice"]


def runtime_record() -> dict[str, Any]:
    """The ``runtime`` entry of results.json: the thread choice and the threads in use."""
    choice = current_choice()
    record = choice.to_dict() if choice is not None else {"source": "torch default"}
    record["threads_in_use"] = torch.get_num_threads()
    return record


def _set_torch_threads(threads: int) -> None:
    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)
    if torch.get_num_interop_threads() != threads:
        # Settable once per process, before any inter-op work: later stages keep it.
        with contextlib.suppress(RuntimeError):
            torch.set_num_interop_threads(threads)


def _publish(choice: ThreadChoice) -> None:
    _set_torch_threads(choice.threads)
    _STATE["choice"] = choice
    key = (choice.threads, choice.source, choice.data_workers, choice.step_gflop is None)
    if key not in _STATE["logged"]:  # once per distinct choice, not once per stage
        _STATE["logged"].add(key)
        workers = "" if choice.data_workers is None else f", {choice.data_workers} data workers"
        log.info(
            "torch threads: %d (%s: %s)%s", choice.threads, choice.source, choice.reason, workers
        )


def _report_load(choice: ThreadChoice) -> None:
    """One line when the machine was already loaded at the first stage of this process."""
    if _STATE["load_checked"]:
        return  # later stages would see this process's own load in the average
    _STATE["load_checked"] = True
    load = choice.load_1min
    if load is None:
        return
    share = load * choice.cores / (os.cpu_count() or choice.cores)
    # A whole core's worth of runnable processes in the average, or half a core busy now.
    if share >= 1.0 or choice.others_busy >= _TAKEN:
        log.warning(
            "machine already loaded: load average %.2f on %d usable cores; using %d torch "
            "thread%s (%s). Set runtime.threads=N to override.",
            load,
            choice.cores,
            choice.threads,
            "" if choice.threads == 1 else "s",
            choice.reason,
        )


def _runtime_cfg(cfg: DictConfig | None) -> tuple[Any, float]:
    node = OmegaConf.select(cfg, "runtime") if cfg is not None else None
    if node is None:
        return "auto", DEFAULT_TINY_STEP_GFLOP
    tiny = node.get("tiny_step_gflop", DEFAULT_TINY_STEP_GFLOP)
    try:
        tiny = float(tiny)
    except (TypeError, ValueError):
        tiny = -1.0
    if tiny < 0:
        raise ConfigError(
            f"runtime.tiny_step_gflop must be a number >= 0, got {node.get('tiny_step_gflop')!r}."
        )
    return node.get("threads", "auto"), tiny


def _data_workers(cfg: DictConfig, choice: ThreadChoice, launcher: str | None) -> int | None:
    if OmegaConf.select(cfg, "data.num_workers") is None:
        return None
    requested = cfg.data.num_workers
    if launcher == "joblib":
        return 0  # loky worker processes cannot start DataLoader worker processes
    if isinstance(requested, str) and requested.strip().lower() == "auto":
        # Workers get what torch's threads leave of this job's cores (never more than 4:
        # in-memory data sets gain nothing, image pipelines saturate there).
        spare = choice.cores // max(1, choice.jobs) - choice.threads
        return max(0, min(4, spare))
    try:
        n = int(requested)
    except (TypeError, ValueError):
        n = -1
    if n < 0:
        raise ConfigError(
            f"data.num_workers must be 'auto' or a whole number >= 0, got {requested!r}."
        )
    return n


def apply_thread_policy(
    cfg: DictConfig | None = None,
    *,
    launcher: str | None = None,
    jobs: int | None = None,
    cores: int | None = None,
) -> tuple[DictConfig | None, ThreadChoice]:
    """Choose and set torch's threads for this stage; resolve ``data.num_workers``.

    ``launcher`` is ``"joblib"`` / ``"submitit"`` / ``"basic"`` / None (see
    ``tnexp.stages.prepare.launcher_kind``); ``jobs`` the training processes that share these
    cores (joblib jobs running at once x CPU DDP ranks).
    Returns ``cfg`` (a modified copy where ``data.num_workers`` changed) and the choice.
    """
    setting, tiny = _runtime_cfg(cfg)
    setting = parse_threads(setting)
    if cfg is not None and OmegaConf.select(cfg, "method.slice_jobs.threads_per_job") is not None:
        raise ConfigError(
            "method.slice_jobs.threads_per_job was replaced by runtime.threads (one thread "
            "policy for every run); e.g. runtime.threads=auto or runtime.threads=1."
        )
    if cores is None:
        cores = usable_cores()
        slurm = os.environ.get("SLURM_CPUS_PER_TASK")
        if launcher == "submitit" and slurm and slurm.isdigit():
            cores = max(1, int(slurm))
    jobs = jobs if jobs is not None else 1
    # Sampling takes 0.25 s: only when the answer depends on it.
    needs_sample = setting == "auto" and os.environ.get("OMP_NUM_THREADS") is None
    needs_sample = needs_sample and cores // max(1, jobs) > 1
    # The decision uses the sample, not the load average: the average lags a minute and
    # holds this process's own earlier stages (the quickstart runs seven in one process).
    busy = others_busy_cores() if needs_sample else 0.0
    load = _load_1min()
    choice = choose_threads(
        setting, cores=cores, jobs=jobs, others_busy=busy, tiny_step_gflop=tiny, load_1min=load
    )
    if cfg is not None:
        workers = _data_workers(cfg, choice, launcher)
        if workers is not None:
            choice = dataclasses.replace(choice, data_workers=workers)
            if workers != cfg.data.num_workers:
                if launcher == "joblib":
                    log.warning(
                        "joblib launcher: data.num_workers=%s -> 0 (loky worker processes "
                        "cannot start DataLoader worker processes)",
                        cfg.data.num_workers,
                    )
                cfg = cfg.copy()
                with open_dict(cfg):
                    cfg.data.num_workers = workers
    _publish(choice)
    _report_load(choice)
    return cfg, choice


def refine_for_work(step_gflop: float, tiny_step_gflop: float) -> ThreadChoice | None:
    """Re-apply an ``auto`` choice once one training step's work is known."""
    choice = current_choice()
    if choice is None or choice.source != "auto":
        return None
    new = choose_threads(
        "auto",
        cores=choice.cores,
        jobs=choice.jobs,
        others_busy=choice.others_busy,
        step_gflop=step_gflop,
        tiny_step_gflop=tiny_step_gflop,
        env={},  # source "auto" means OMP_NUM_THREADS was not set
        load_1min=choice.load_1min,
    )
    new = dataclasses.replace(new, data_workers=choice.data_workers)
    _publish(new)
    return new


def _lightning_callback_base() -> type:
    import lightning as L

    return L.Callback


class ThreadPolicyCallback(_lightning_callback_base()):
    """Counts the FLOPs of the first training step and drops to 1 thread if it is tiny.

    Only for ``auto`` choices on CPU: a measured step is the one work size that fits every
    model and method (local steps include the teacher's forward). Later steps run with the
    refined choice; the first one runs with the stage-start choice.
    """

    def __init__(self, tiny_step_gflop: float = DEFAULT_TINY_STEP_GFLOP) -> None:
        self.tiny_step_gflop = tiny_step_gflop
        self._counter: Any = None
        self._done = False

    def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, idx: int) -> None:
        choice = current_choice()
        if self._done or choice is None or choice.source != "auto" or choice.threads == 1:
            self._done = True
            return
        if trainer.strategy.root_device.type != "cpu":
            self._done = True  # the step's work is on the accelerator
            return
        from torch.utils.flop_counter import FlopCounterMode

        self._counter = FlopCounterMode(display=False)
        self._counter.__enter__()

    def on_train_batch_end(self, trainer: Any, pl_module: Any, *args: Any) -> None:
        self._finish()

    def on_train_end(self, trainer: Any, pl_module: Any) -> None:
        self._finish()

    def on_exception(self, trainer: Any, pl_module: Any, exception: BaseException) -> None:
        self._finish()

    def _finish(self) -> None:
        if self._counter is None:
            return
        counter, self._counter = self._counter, None
        self._done = True
        counter.__exit__(None, None, None)
        refine_for_work(counter.get_total_flops() / 1e9, self.tiny_step_gflop)


def reset_state() -> None:
    """Forget earlier choices (tests; a new process starts empty anyway)."""
    _STATE.update(choice=None, logged=set(), load_checked=False)
