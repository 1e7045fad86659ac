"""What the `tnexp` command does: one training stage, or the quickstart pipeline.

A stage builds the data, the model and (except for pretraining) the teacher and the
tensorized student through the one factory, trains it with the method's LightningModule,
and writes into its output directory: ``results.json``, CSV logs, Lightning checkpoints
(``checkpoints/``) and the final and best weights as safetensors.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf, open_dict

from tnexp.callbacks import OptimizationTimer
from tnexp.config import plain as _plain
from tnexp.data.phased import PhasedDataModule
from tnexp.errors import ConfigError, InputFileError
from tnexp.factory import count_parameters, save_tensorized
from tnexp.integrity import atomic_write_json
from tnexp.modules import (
    DivergenceGuard,
    GlobalConfig,
    GlobalFinetune,
    Hybrid,
    LocalConfig,
    LocalDistillation,
    TensorizationModule,
)
from tnexp.rundir import run_directory_lock
from tnexp.runtime import DEFAULT_TINY_STEP_GFLOP as TINY_STEP_GFLOP
from tnexp.runtime import ThreadPolicyCallback, runtime_record
from tnexp.slice_jobs import SliceJobOutput, cache_lock, prepare_stage, select_slices
from tnexp.slicing import make_slice_plan
from tnexp.student import (
    build_student,
    tensorize_spec,  # noqa: F401  (tests and notebooks import it here)
)
from tnexp.tasks import CausalLMTask, ClassificationTask

log = logging.getLogger("tnexp")
METHODS = ("pretrain", "local", "global", "hybrid")
TEACHER_FILE = "teacher.safetensors"


def run(cfg: DictConfig) -> dict[str, Any] | list[dict[str, Any]]:
    if cfg.method.name == "quickstart":
        from tnexp.quickstart import run_quickstart

        return run_quickstart(cfg)
    if cfg.method.name == "profile":
        from tnexp.profiling import run_profile

        return run_profile(cfg)
    if cfg.method.name == "analyze":  # bond spectra and entropy: tnexp/analysis/
        from tnexp.analysis.stage import run_analyze

        return run_analyze(cfg)
    if cfg.method.name in ("assemble", "capture"):  # slice-parallel local: tnexp/slice_jobs.py
        from tnexp.slice_jobs import run_assemble, run_capture

        with run_directory_lock(cfg.paths.output_dir):
            return run_assemble(cfg) if cfg.method.name == "assemble" else run_capture(cfg)
    return run_stage(cfg)


# ------------------------------------------------------------------ building blocks
def build_datamodule(cfg: DictConfig) -> L.LightningDataModule:
    data_cfg = OmegaConf.to_container(cfg.data, resolve=True)
    data_cfg.pop("info", None)  # description of the data set, not a constructor argument
    data_cfg.pop("smoke", None)  # smoke=true settings (tnexp/config.py), applied or not
    return instantiate(data_cfg)


def build_task(cfg: DictConfig) -> ClassificationTask | CausalLMTask:
    kind = cfg.data.info.get("task", "classification")
    if kind == "classification":
        return ClassificationTask(cfg.data.info.num_classes)
    if kind == "causal_lm":
        return CausalLMTask()
    raise ConfigError(f"data.info.task must be 'classification' or 'causal_lm', got {kind!r}.")


def build_model(cfg: DictConfig) -> torch.nn.Module:
    model_cfg = OmegaConf.to_container(cfg.model, resolve=True)
    model_cfg.pop("smoke", None)  # smoke=true settings (tnexp/config.py), applied or not
    return instantiate(model_cfg)


def resolve_teacher_path(path: str | None) -> Path:
    if not path:
        raise ConfigError(
            "this method needs a pretrained teacher: set teacher.path to the teacher.safetensors "
            "written by `tnexp method=pretrain` (or to that run's output directory)."
        )
    p = Path(path)
    if p.is_dir():
        p = p / TEACHER_FILE
    if not p.is_file():
        raise InputFileError(
            f"teacher checkpoint {p} does not exist; run `tnexp method=pretrain` first and "
            "point teacher.path at its output."
        )
    return p


def is_language_model(cfg: DictConfig) -> bool:
    return cfg.data.info.get("task", "classification") == "causal_lm"


def load_teacher(cfg: DictConfig) -> torch.nn.Module:
    """The pretrained dense model: a pretrain run's safetensors, or an LM's own weights."""
    if not cfg.teacher.path and is_language_model(cfg):
        return build_model(cfg).eval()  # hub / GGUF weights are the teacher
    from safetensors import safe_open
    from safetensors.torch import load_model

    path = resolve_teacher_path(cfg.teacher.path)
    model = build_model(cfg)
    try:
        with safe_open(str(path), framework="pt") as f:
            shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}  # noqa: SIM118
    except Exception as err:  # safetensors raises its own error types on corrupt files
        raise ConfigError(
            f"cannot read teacher checkpoint {path} ({err}): it is truncated or not a "
            "safetensors file; point teacher.path at the teacher.safetensors of a finished "
            "pretrain run (or rerun it)."
        ) from None
    own = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    # Tied weights (GPT-2's lm_head / wte) are stored once; any one name of a tie counts.
    tied = _tied_names(model)
    missing = sorted(k for k in set(own) - set(shapes) if not (tied.get(k, set()) & set(shapes)))
    unexpected = sorted(set(shapes) - set(own))
    mismatched = [
        f"{k}: checkpoint {shapes[k]} vs model {own[k]}"
        for k in own
        if k in shapes and shapes[k] != own[k]
    ]
    if missing or unexpected or mismatched:
        details = "; ".join(
            part
            for part in (
                f"missing {missing[:5]}{'...' if len(missing) > 5 else ''}" if missing else "",
                f"unexpected {unexpected[:5]}" if unexpected else "",
                f"shape mismatch {mismatched[:3]}" if mismatched else "",
            )
            if part
        )
        raise ConfigError(
            f"teacher checkpoint {path} does not match model {cfg.model._target_} "
            f"({details}). Use the same model and data settings as the pretrain run."
        )
    load_model(model, str(path), strict=True)
    return model.eval()


def _tied_names(model: torch.nn.Module) -> dict[str, set[str]]:
    by_tensor: dict[int, set[str]] = {}
    for name, tensor in model.state_dict(keep_vars=True).items():
        by_tensor.setdefault(id(tensor), set()).add(name)
    return {n: names - {n} for names in by_tensor.values() if len(names) > 1 for n in names}


def build_module(
    cfg: DictConfig, teacher: torch.nn.Module | None, student: torch.nn.Module, task: Any
) -> TensorizationModule:
    method = cfg.method
    guard = DivergenceGuard(factor=(cfg.get("guard") or {}).get("divergence_factor", 1.0e4))
    if method.name in ("pretrain", "global"):
        return GlobalFinetune(
            student, task, global_=GlobalConfig(**_plain(method["global"])), guard=guard
        )
    plan = select_slices(make_slice_plan(student, _plain(method.slicing)), method)
    local = LocalConfig(**_plain(method.local))
    if method.features == "cached" and local.input_source == "student":
        raise ConfigError(
            "method.local.input_source=student needs the student's live outputs; use "
            "method.features=online."
        )
    if method.name == "local":
        return LocalDistillation(
            student, task, teacher=teacher, plan=plan, local=local, guard=guard
        )
    if method.name == "hybrid":
        return Hybrid(
            student,
            task,
            teacher=teacher,
            plan=plan,
            local_epochs=int(method.local_epochs),
            local=local,
            global_=GlobalConfig(**_plain(method["global"])),
            guard=guard,
        )
    raise ConfigError(f"unknown method {method.name!r}; choose one of {METHODS} or quickstart.")


def build_feature_cache(cfg: DictConfig, module: TensorizationModule, datamodule, out: Path):
    """Capture (or reuse) the teacher features on disk for a cached local phase."""
    from tnexp.features import open_feature_cache, teacher_fingerprint, write_feature_cache

    method = cfg.method
    fingerprint = teacher_fingerprint(module.teacher)
    cache_dir = feature_cache_dir(cfg, fingerprint)
    datamodule.setup("fit")
    full_plan = make_slice_plan(module.student, _plain(method.slicing))
    with cache_lock(cache_dir):  # concurrent slice jobs: one captures, the others wait
        write_feature_cache(
            cache_dir,
            module.teacher,
            full_plan,
            datamodule.train_dataloader(),
            dtype=method.cache.dtype,
            dataset_identity=datamodule.identity(),
            shard_size=int(method.cache.shard_size),
            overwrite=bool(method.cache.get("overwrite", False)),
        )
    return open_feature_cache(
        cache_dir,
        teacher_fingerprint=fingerprint,
        dataset_identity=datamodule.identity(),
        plan=module.plan,
        dtype=method.cache.dtype,
        verify_checksums=bool(method.cache.verify_checksums),
    )


def feature_cache_dir(cfg: DictConfig, fingerprint: str) -> Path:
    """``method.cache.dir``, or one directory per teacher, slicing and dtype."""
    method = cfg.method
    if method.cache.dir:
        return Path(method.cache.dir)
    name = f"{fingerprint[:16]}-{_slug(method.slicing)}-{method.cache.dtype}"
    return Path(cfg.paths.cache_dir) / name


def _slug(value: Any) -> str:
    return "".join(c if c.isalnum() else "_" for c in str(value))[:40]


WANDB_ID_FILE = "wandb_run_id.txt"


def _resumable_csv_logger(save_dir: Path, resuming: bool):
    """Lightning's CSVLogger; when ``resuming``, it appends to the existing metrics.csv.

    Lightning's writer deletes an existing metrics.csv when it starts, so a resumed run
    would lose the rows of the epochs before the interruption.
    """
    import csv

    from lightning.pytorch.loggers import CSVLogger
    from lightning.pytorch.loggers.csv_logs import ExperimentWriter

    class _AppendingWriter(ExperimentWriter):
        def _check_log_dir_exists(self) -> None:
            if not Path(self.metrics_file_path).is_file():
                return
            with open(self.metrics_file_path, newline="") as handle:
                header = next(csv.reader(handle), [])
            self.metrics_keys = list(header)  # new keys rewrite the header, keeping the rows

    class _Logger(CSVLogger):
        @property
        def experiment(self):  # the writer is created lazily, like Lightning's
            if self._experiment is None:
                self._fs.makedirs(self.root_dir, exist_ok=True)
                self._experiment = _AppendingWriter(log_dir=self.log_dir)
            return self._experiment

    cls = _Logger if resuming else CSVLogger
    return cls(save_dir=str(save_dir), name="csv", version="")


def _wandb_run_id(out: Path, resuming: bool) -> str:
    """The W&B run id of this run directory: reused on resume, so W&B continues one run."""
    path = out / WANDB_ID_FILE
    if resuming and path.is_file() and path.read_text().strip():
        return path.read_text().strip()
    import uuid

    run_id = uuid.uuid4().hex[:12]
    path.write_text(run_id + "\n")
    return run_id


def build_loggers(cfg: DictConfig, out: Path, run_name: str, resuming: bool = False) -> list:
    from lightning.pytorch.loggers import WandbLogger

    loggers: list = []
    if cfg.logger.csv:
        loggers.append(_resumable_csv_logger(out, resuming))
    wb = cfg.logger.wandb
    if wb.enabled and wb.mode != "disabled":
        wandb_logger = WandbLogger(
            id=_wandb_run_id(out, resuming),
            resume="allow",
            project=wb.project,
            entity=wb.entity,
            group=wb.group,
            job_type=wb.job_type,
            name=wb.name or run_name,
            tags=[str(t) for t in (wb.tags or [])] + [cfg.method.name],
            save_dir=str(out),
            offline=wb.mode == "offline",
            config=OmegaConf.to_container(cfg, resolve=True),
        )
        # Lightning always passes anonymous=None, which recent wandb answers with a
        # deprecation warning on stderr for every run; the setting does nothing.
        getattr(wandb_logger, "_wandb_init", {}).pop("anonymous", None)
        loggers.append(wandb_logger)
    return loggers


def build_trainer(
    cfg: DictConfig, out: Path, loggers: list, timer: OptimizationTimer, task: Any, reload: bool
) -> L.Trainer:
    from lightning.pytorch.callbacks import ModelCheckpoint, ProgressBar

    from tnexp.console import progress_callbacks

    cb = cfg.callbacks
    callbacks: list = [
        timer,
        # auto threads: drop to one thread after the first step if the work is tiny
        ThreadPolicyCallback(
            float(OmegaConf.select(cfg, "runtime.tiny_step_gflop", default=TINY_STEP_GFLOP))
        ),
        ModelCheckpoint(
            dirpath=str(out / "checkpoints"),
            filename="best",
            monitor=task.monitor,
            mode=task.mode,
            save_last=bool(cb.checkpoint.save_last),
            save_top_k=int(cb.checkpoint.save_top_k),
        ),
    ]
    progress = progress_callbacks(cb.progress_bar)
    callbacks += progress
    kwargs = {
        k: v for k, v in OmegaConf.to_container(cfg.trainer, resolve=True).items() if v is not None
    }
    return L.Trainer(
        **kwargs,
        logger=loggers or False,
        callbacks=callbacks,
        enable_progress_bar=any(isinstance(c, ProgressBar) for c in progress),
        default_root_dir=str(out),
        reload_dataloaders_every_n_epochs=1 if reload else 0,
    )


def resolve_resume(cfg: DictConfig, out: Path) -> str | None:
    if cfg.resume in (None, False):
        return None
    if cfg.resume == "auto":
        last = out / "checkpoints" / "last.ckpt"
        if last.is_file():
            log.info("resuming from %s", last)
            return str(last)
        log.info("resume=auto: no checkpoint in %s, starting fresh", last.parent)
        return None
    path = Path(cfg.resume)
    if not path.is_file():
        raise InputFileError(
            f"resume checkpoint {path} does not exist; give an existing .ckpt, resume=auto "
            "(the run directory's last.ckpt), or resume=null to start fresh."
        )
    return str(path)


# ------------------------------------------------------------------ one stage
def run_stage(cfg: DictConfig) -> dict[str, Any]:
    """Run one method (pretrain, local, global or hybrid) and write results.json.

    The run directory is locked for the duration (one run per directory).
    """
    method = cfg.method.name
    if method not in METHODS:
        raise ConfigError(f"unknown method {method!r}; choose one of {METHODS} or quickstart.")
    out = Path(cfg.paths.output_dir)
    with run_directory_lock(out):
        return _run_stage_locked(cfg, out)


def _run_stage_locked(cfg: DictConfig, out: Path) -> dict[str, Any]:
    method = cfg.method.name
    cfg = prepare_stage(cfg)  # multirun checks, thread policy, data workers
    L.seed_everything(int(cfg.seed), workers=True, verbose=False)
    torch.set_float32_matmul_precision("high")
    if (cfg.method.get("memory_bounded") or {}).get("enabled"):
        from tnexp.blockwise import run_memory_bounded_stage  # block by block, bounded memory

        try:
            return run_memory_bounded_stage(cfg)
        except Exception as err:
            write_failed_results(cfg, out, err, phase="local")
            raise

    datamodule = build_datamodule(cfg)
    task = build_task(cfg)
    report = None
    teacher = None
    if method == "pretrain":
        student = build_model(cfg)
    else:
        teacher = load_teacher(cfg)
        student, report = build_student(cfg, teacher, datamodule, task)
    module = build_module(cfg, teacher, student, task)

    feature_cache = None
    if method in ("local", "hybrid") and cfg.method.features == "cached":
        feature_cache = build_feature_cache(cfg, module, datamodule, out)
    elif method in ("local", "hybrid") and cfg.method.features != "online":
        raise ConfigError(
            f"method.features must be 'online' or 'cached', got {cfg.method.features!r}"
        )
    # Per-slice job output (method.slice_jobs.dir): skips done slices, records the rest.
    jobs = SliceJobOutput.start(cfg, module, report, datamodule, feature_cache)
    if jobs is not None:
        if jobs.done:
            return jobs.skipped_results()
        feature_cache = jobs.feature_cache
    phased = PhasedDataModule(datamodule, feature_cache)

    run_name = _run_name(cfg, report)
    ckpt_path = resolve_resume(cfg, out)
    loggers = build_loggers(cfg, out, run_name, resuming=ckpt_path is not None)
    timer = OptimizationTimer(monitor=task.monitor, mode=task.mode)
    trainer = build_trainer(cfg, out, loggers, timer, task, reload=method == "hybrid")
    if jobs is not None:
        trainer.callbacks.append(jobs.callback)
    before = evaluate_language_model(cfg, datamodule, student, "before_training")
    if teacher is not None and not before:
        before = evaluate_classification(cfg, datamodule, student, task)
    started = time.time()
    try:
        # weights_only: checkpoints hold tensors and plain values only, so load them safely.
        trainer.fit(module, datamodule=phased, ckpt_path=ckpt_path, weights_only=True)
    except BaseException as err:
        if jobs is not None:
            jobs.record_failure(err, timer)
        if not isinstance(err, KeyboardInterrupt | SystemExit):
            phase = module.phase.method if module._trainer is not None else None
            write_failed_results(
                cfg, out, err, phase=phase, epochs=trainer.current_epoch, step=trainer.global_step
            )
        raise
    if jobs is not None:
        jobs.record_success(module.student, timer)
    wall = time.time() - started
    extra = {"before": before} if before else {}
    after = evaluate_language_model(cfg, datamodule, module.student, "final")
    if after:
        extra["final_eval"] = after
    if teacher is not None:
        dense = evaluate_language_model(cfg, datamodule, teacher, "teacher")
        if dense:
            extra["teacher"] = dense
    results = write_results(cfg, out, trainer, timer, module, report, wall, extra)
    _finish_loggers(loggers, results)
    return results


def _run_name(cfg: DictConfig, report: Any) -> str:
    if cfg.get("run_name"):
        return str(cfg.run_name)
    if report is None:
        return cfg.method.name
    return f"{cfg.method.name}-cr{cfg.tensorize.get('cr', report.model_cr)}"


def write_results(
    cfg: DictConfig,
    out: Path,
    trainer: L.Trainer,
    timer: OptimizationTimer,
    module: TensorizationModule,
    report: Any,
    wall_s: float,
    extra_metrics: dict[str, Any] | None = None,
) -> dict[str, Any]:
    from safetensors.torch import save_model

    final = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/")}
    if cfg.method.name == "pretrain":
        save_model(module.student, str(out / TEACHER_FILE))
        weights = {"teacher": str(out / TEACHER_FILE)}
    else:
        base_config = OmegaConf.to_container(cfg.model, resolve=True)
        save_tensorized(module.student, report, out / "student", base_config=base_config)
        weights = {"student": str(out / "student")}
    best_ckpt = trainer.checkpoint_callback.best_model_path if trainer.checkpoint_callback else ""
    results = {
        "status": "ok",
        "method": cfg.method.name,
        "experiment": cfg.experiment_name,
        "task": {"monitor": timer.monitor, "mode": timer.mode},
        "metrics": {
            "final": final,
            "best": {timer.monitor: timer.best_value},
            **(extra_metrics or {}),
        },
        "time": {**timer.summary(), "run_wall_s": wall_s},
        "params": {
            "student": count_parameters(module.student),
            "teacher": count_parameters(module.teacher) if module.teacher is not None else None,
        },
        "tensorize": report.to_dict() if report is not None else None,
        "weights": {**weights, "best_checkpoint": best_ckpt or None},
        "data": data_summary(cfg, trainer),
        "epochs": trainer.current_epoch,
        "global_step": trainer.global_step,
        "runtime": runtime_record(),
        "config": OmegaConf.to_container(cfg, resolve=True),
    }
    atomic_write_json(out / "results.json", results)
    log.info("results written to %s", out / "results.json")
    return results


def write_failed_results(
    cfg: DictConfig,
    out: Path,
    err: BaseException,
    *,
    phase: str | None = None,
    epochs: int | None = None,
    step: int | None = None,
) -> dict[str, Any]:
    """results.json of a run that stopped with an error: ``status: failed``, no metrics.

    Aggregation and readers see a failed run, never a diverged model's numbers as a result.
    """
    results = {
        "status": "failed",
        "method": cfg.method.name,
        "experiment": cfg.experiment_name,
        "error": {"type": type(err).__name__, "message": str(err)},
        "phase": phase,
        "epochs": epochs,
        "global_step": step,
        "config": OmegaConf.to_container(cfg, resolve=True),
    }
    try:
        atomic_write_json(out / "results.json", results)
    except OSError as write_err:  # never mask the training error with a bookkeeping one
        log.error("could not write %s: %s", out / "results.json", write_err)
    return results


def data_summary(cfg: DictConfig, trainer: L.Trainer) -> dict[str, Any]:
    """Data set name and number of training samples (the paper's 50k / 30k / 10k rows)."""
    datamodule = getattr(trainer, "datamodule", None)
    base = getattr(datamodule, "base", datamodule)
    train_set = getattr(base, "train_set", None)
    try:
        samples = len(train_set) if train_set is not None else None
    except TypeError:  # iterable data sets have no length
        samples = None
    return {"name": cfg.data.info.get("name"), "train_samples": samples}


def summary_metrics(results: dict[str, Any]) -> dict[str, Any]:
    """The flat metrics that W&B's run summary shares with results.json."""
    flat: dict[str, Any] = {}
    for kind in ("final", "best"):
        for key, value in results["metrics"][kind].items():
            flat[f"{kind}/{key}"] = value
    for key in ("optimization_s", "wall_s", "time_to_best_s", "best_value"):
        if key in results["time"]:
            flat[f"time/{key}"] = results["time"][key]
    if results.get("tensorize"):
        flat["params/model_cr"] = results["tensorize"]["totals"]["model_cr"]
    flat["params/student"] = results["params"]["student"]
    for stage in ("before", "final_eval", "teacher"):
        for key, value in (results["metrics"].get(stage) or {}).items():
            if isinstance(value, int | float):
                flat[f"{stage}/{key}"] = value
    return flat


def _finish_loggers(loggers: list, results: dict[str, Any]) -> None:
    from lightning.pytorch.loggers import WandbLogger

    for logger in loggers:
        if isinstance(logger, WandbLogger):
            logger.experiment.summary.update(summary_metrics(results))
            logger.experiment.finish()


def with_overrides(cfg: DictConfig, **values: Any) -> DictConfig:
    """A copy of ``cfg`` with dotted keys set (used by the quickstart pipeline)."""
    new = cfg.copy()
    with open_dict(new):
        for key, value in values.items():
            OmegaConf.update(new, key, value, merge=False)
    return new


def _eval_device(cfg: DictConfig, model: torch.nn.Module) -> torch.device:
    device = next(model.parameters()).device
    if torch.cuda.is_available() and device.type == "cpu" and cfg.trainer.accelerator != "cpu":
        device = torch.device("cuda")
    return device


def _val_batches(limit: Any, available: int) -> int:
    """Lightning's ``limit_val_batches``: None or 1.0 all, a float a fraction, an int a count."""
    if limit is None or (isinstance(limit, float) and limit == 1.0):
        return available
    if isinstance(limit, float):
        return int(available * limit)
    return min(int(limit), available)


def evaluate_classification(
    cfg: DictConfig, datamodule: Any, model: torch.nn.Module, task: Any
) -> dict[str, float]:
    """Validation metrics of ``model`` on the batches the fit loop validates on.

    Run on the freshly tensorized student: the accuracy right after tensorization, before
    any recovery (``metrics.before`` in results.json, time 0 of the accuracy-vs-time plots).
    """
    if is_language_model(cfg) or not cfg.eval.classification.before_training:
        return {}
    from tnexp.features import to_device

    datamodule.setup("validate")
    loader = datamodule.val_dataloader()
    batches = _val_batches(cfg.trainer.get("limit_val_batches"), len(loader))
    home = next(model.parameters()).device
    device = _eval_device(cfg, model)
    was_training = model.training
    model.to(device).eval()
    metrics = task.make_metrics().to(device)
    with torch.no_grad():
        for i, batch in enumerate(loader):
            if i >= batches:
                break
            batch = to_device(batch, device)
            outputs = task.forward(model, batch)
            task.update_metrics(metrics, outputs, batch, task.loss(outputs, batch))
    model.to(home).train(was_training)
    values = {f"val/{k}": v for k, v in task.finalize(metrics.compute()).items()}
    log.info("before recovery: %s", ", ".join(f"{k} {v:.2f}" for k, v in values.items()))
    return values


def evaluate_language_model(
    cfg: DictConfig, datamodule: Any, model: torch.nn.Module, when: str
) -> dict[str, Any]:
    """Token perplexity (sliding window) and, if enabled, lm-eval tasks, for LM stages.

    ``when`` is ``before_training`` (the student as tensorized), ``final`` or ``teacher``.
    lm-eval runs only on the final student (and the teacher), never before training.
    """
    if not is_language_model(cfg):
        return {}
    ev = cfg.eval
    if when == "before_training" and not ev.perplexity.before_training:
        return {}
    if when == "teacher" and not ev.perplexity.teacher:
        return {}
    from tnexp.eval import evaluate_lm, sliding_window_perplexity

    datamodule.setup("validate")
    device = _eval_device(cfg, model)
    results: dict[str, Any] = {}
    if ev.perplexity.enabled:
        tokens = datamodule.val_tokens
        if ev.perplexity.max_tokens:
            tokens = tokens[: int(ev.perplexity.max_tokens)]
        max_length = int(ev.perplexity.max_length or cfg.data.seq_len)
        stride = int(ev.perplexity.stride or max(1, max_length // 2))
        was_training = model.training
        model.eval()
        ppl = sliding_window_perplexity(
            model, tokens, max_length=max_length, stride=stride, device=device
        )
        model.train(was_training)
        results["token_ppl"] = float(ppl["ppl"])
        results["token_nll"] = float(ppl["nll"])
        results["ppl_tokens"] = int(ppl["tokens"])
        log.info("%s token perplexity: %.3f", when, results["token_ppl"])
    if ev.lm_eval.enabled and when != "before_training":
        try:
            scores = evaluate_lm(
                model,
                datamodule.tokenizer,
                tasks=list(ev.lm_eval.tasks),
                limit=ev.lm_eval.limit,
                batch_size=int(ev.lm_eval.batch_size),
                num_fewshot=ev.lm_eval.num_fewshot,
                include_path=ev.lm_eval.include_path,
                device=str(device),
            )
        except Exception as err:  # lm-eval needs datasets that may not be reachable
            raise RuntimeError(
                f"lm-eval failed ({err}). Its tasks need the HF hub or a local datasets "
                "cache; set eval.lm_eval.enabled=false or point HF_DATASETS_CACHE at one."
            ) from err
        results.update({f"lm_eval/{k}": v for k, v in scores.items()})
    return results
