"""The block-by-block driver: student layout, prefix pass, stage after stage, assembly."""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import gc
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Subset

from tnexp.calibration import InputStats
from tnexp.callbacks import OptimizationTimer
from tnexp.factory import (
    TensorizeReport,
    TensorizeSpec,
    count_parameters,
    match_pattern,
    plan_layers,
    solve_overall_cr,
    supported_kind,
    tensorize,
)
from tnexp.features import to_device
from tnexp.memory_bounded.blocks import (
    StageShell,
    attach_module,
    inside,
    placeholder_layer,
    plan_stages,
    set_module,
    swapped,
)
from tnexp.memory_bounded.config import (
    HOST,
    BlockwiseConfig,
    BlockwiseError,
    BlockwiseResult,
    Stage,
    StageStats,
)
from tnexp.memory_bounded.replay import batch_counts, batch_len, has_tensor, replay_schedule
from tnexp.memory_bounded.resume import StageManifest, setup_fingerprint
from tnexp.memory_bounded.spill import DiskStore, MemoryStore
from tnexp.memory_bounded.teacher import PrefixProbe, TeacherBlocks, verify_chain
from tnexp.memory_bounded.train import RunLog, StageData, train_stage
from tnexp.memory_bounded.weights import (
    WeightsFile,
    materialize,
    materialize_outside,
    on_meta,
    release,
    retie,
)
from tnexp.modules.losses import attention_mask
from tnexp.modules.tensorization import LocalConfig
from tnexp.slicing import SlicePlan, make_slice_plan

log = logging.getLogger("tnexp")

__all__ = ["distill_blockwise"]


def _resolve_device(name: str) -> torch.device:
    if name in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise BlockwiseError(f"device {name!r} was requested but CUDA is not available.")
    return device


def _stage_spec(spec: TensorizeSpec, shell: nn.Module, per_layer_cr: float | None) -> TensorizeSpec:
    """``spec`` narrowed to the modules under ``shell``, with the solved per-layer CR.

    Rules and exclusions that match no tensorizable module there are dropped (the factory
    rejects them); every remaining module keeps its first matching rule, and the size
    comes from the CR solved once over the whole model, so each layer gets the shape the
    whole-model tensorization gives it.
    """
    names = [n for n, m in shell.named_modules() if n and supported_kind(m)]

    def used(pattern: str) -> bool:
        return any(match_pattern(n, pattern) for n in names)

    rules = [
        dataclasses.replace(r, cr=per_layer_cr)
        if per_layer_cr is not None and not r.has_explicit_size
        else r
        for r in spec.rules
        if used(r.pattern)
    ]
    # Everything else (damping, ALS sweeps, contraction...) as the whole-model spec says.
    return dataclasses.replace(
        spec, rules=rules, exclude=[e for e in spec.exclude if used(e)], overall_cr=None
    )


@dataclass
class _Layout:
    """The student's structure, fixed before any training: slices, stages, layer sizes."""

    plan: SlicePlan
    stages: list[Stage]
    spec: TensorizeSpec | Mapping[str, Any] | None
    per_layer_cr: float | None
    tensorized_names: list[str]
    student: nn.Module | None = None  # offload=cpu: the whole student, tensorized up front
    report: TensorizeReport | None = None  # offload=cpu: its report
    weights: WeightsFile | None = None  # offload=disk: the teacher's safetensors


def _student_layout(
    teacher: nn.Module,
    spec: TensorizeSpec | Mapping[str, Any] | None,
    student: tuple[nn.Module, TensorizeReport] | None,
    teacher_weights: str | Path | None,
    config: BlockwiseConfig,
    granularity: Any,
    slices: Sequence[int | str] | None,
) -> _Layout:
    """Plan slices and stages: on the tensorized student (cpu), or on the teacher's skeleton
    with parameter-free stand-ins of the layers the factory will build (disk)."""

    def planned_stages(model: nn.Module) -> tuple[SlicePlan, list[Stage]]:
        plan = make_slice_plan(model, granularity)
        if slices is not None:
            plan = plan.select(list(slices))
        return plan, plan_stages(model, plan)

    if config.offload == "cpu":
        if on_meta(teacher):
            raise BlockwiseError(
                "offload=cpu needs the teacher's weights in host memory, but some of its "
                "parameters are on the meta device; use offload=disk with teacher_weights."
            )
        if student is None:
            if spec is None:
                raise BlockwiseError("pass a tensorization spec (or a tensorized student).")
            student = tensorize(teacher, spec)
        student_model, report = student
        student_model.eval()
        plan, stages = planned_stages(student_model)
        names = [layer.name for layer in report.layers]
        return _Layout(plan, stages, spec, report.per_layer_cr, names, student_model, report)
    if student is not None:
        raise BlockwiseError(
            "offload=disk tensorizes each block when it is loaded; do not pass a student."
        )
    if spec is None:
        raise BlockwiseError("offload=disk needs the tensorization spec.")
    if teacher_weights is None:
        raise BlockwiseError(
            "offload=disk reads the teacher block by block from a safetensors file: pass "
            "teacher_weights (method.memory_bounded.teacher_weights), written once with "
            "tnexp.memory_bounded.export_teacher_weights or by `tnexp method=pretrain`."
        )
    spec = TensorizeSpec.from_config(spec)
    if spec.allocation != "uniform":
        raise BlockwiseError(
            f"offload=disk tensorizes block by block and cannot allocate ranks across the "
            f"whole model (tensorize.allocation={spec.allocation!r}); use "
            "tensorize.allocation=uniform or method.memory_bounded.offload=cpu."
        )
    weights = WeightsFile(teacher_weights)
    retie(teacher)
    planned = plan_layers(teacher, spec)
    per_layer_cr = (
        solve_overall_cr(teacher, planned, spec.overall_cr) if spec.overall_cr is not None else None
    )
    with swapped(teacher, {item.name: placeholder_layer(item) for item in planned}):
        plan, stages = planned_stages(teacher)
    names = [item.name for item in planned]
    return _Layout(plan, stages, spec, per_layer_cr, names, weights=weights)


def distill_blockwise(
    teacher: nn.Module,
    spec: TensorizeSpec | Mapping[str, Any] | None,
    train_loader: DataLoader,
    task: Any,
    *,
    granularity: Any = "block",
    slices: Sequence[int | str] | None = None,
    local: LocalConfig | None = None,
    config: BlockwiseConfig | None = None,
    teacher_weights: str | Path | None = None,
    student: tuple[nn.Module, TensorizeReport] | None = None,
    loggers: Sequence[Any] = (),
    identity: Mapping[str, Any] | None = None,
    input_stats: Callable[[TeacherBlocks, Sequence[str]], InputStats | None] | None = None,
) -> BlockwiseResult:
    """Train the tensorized slices of ``teacher`` block by block (see the module docstring).

    Args:
        teacher: ``offload="cpu"``: the pretrained model in host memory. ``offload="disk"``:
            its skeleton (:func:`build_skeleton`; parameters may be on the meta device),
            whose weights come from ``teacher_weights``. In disk mode this object becomes
            the assembled student (its blocks are replaced), so the teacher is never copied.
        spec: the tensorization spec (rules, exclusions, overall CR), as for
            :func:`tnexp.factory.tensorize`. May be None in cpu mode when ``student`` is given.
        train_loader: the normal mode's training loader; its batches are replayed.
        task: ``tnexp.tasks`` task (``model_inputs`` turns a batch into model inputs).
        granularity, slices: the slice plan, as ``method.slicing`` / ``method.slices``.
        local: loss, input source, trainable parameters and optimizer.
        config: offload, device, schedule (:class:`BlockwiseConfig`).
        teacher_weights: safetensors of the teacher for ``offload="disk"``.
        student: cpu mode only: an already tensorized ``(student, report)`` (run_stage
            passes the one it built, so initialisation matches the normal mode).
        loggers: Lightning loggers (CSV, W&B) to receive the per-step losses.
        identity: extra values identifying the run for ``resume`` (data, seed, model).
        input_stats: disk mode, data-aware inits: called with the paged teacher and the
            block paths once the prefix and head are loaded; returns the input statistics
            (collected with the blocks read from disk one at a time) the factory uses.
    """
    config = config or BlockwiseConfig()
    local = local or LocalConfig()
    device = _resolve_device(config.device)
    if not isinstance(train_loader, DataLoader):
        raise BlockwiseError(
            f"train_loader must be a torch DataLoader (its sampler is replayed), got "
            f"{type(train_loader).__name__}."
        )
    teacher.eval().requires_grad_(False)
    teacher_params = count_parameters(teacher)

    layout = _student_layout(teacher, spec, student, teacher_weights, config, granularity, slices)
    plan, stages, spec, weights = layout.plan, layout.stages, layout.spec, layout.weights
    student_model, report = layout.student, layout.report
    per_layer_cr, tensorized_names = layout.per_layer_cr, layout.tensorized_names
    rest: dict[str, nn.Module] = {}  # tensorized layers outside the blocks (disk mode)
    layer_reports: dict[str, Any] = {}
    block_paths = [b for s in stages for b in s.blocks]
    outside = [n for n in tensorized_names if not any(inside(n, b) for b in block_paths)]
    last_trained = max(s.index for s in stages if s.slices)
    source = local.input_source
    tensorized_stage = {
        s.index: any(inside(n, b) for n in tensorized_names for b in s.blocks) for s in stages
    }

    # ---------------------------------------------------------------- host part (prefix/head)
    teacher_access = TeacherBlocks(teacher, weights)
    grams: InputStats | None = None  # disk mode, data-aware inits: the teacher's input Grams
    if weights is not None:
        # Everything outside the blocks (stem / embeddings, head) lives in host memory.
        materialize_outside(teacher, weights, block_paths)
        if input_stats is not None:
            grams = input_stats(teacher_access, block_paths)
        if outside:
            shell = StageShell(teacher, outside)
            rest_student, rest_report = tensorize(
                shell, _stage_spec(spec, shell, per_layer_cr), stats=grams
            )
            rest = {n: rest_student.get_submodule(n) for n in outside}
            layer_reports.update({layer.name: layer for layer in rest_report.layers})

    # ---------------------------------------------------------------- schedule and streams
    schedule = replay_schedule(train_loader, config.epochs, config.limit_batches, config.max_steps)
    steps_per_stage = sum(len(e) for e in schedule)
    if steps_per_stage == 0:
        raise BlockwiseError("the training loader yields no batches; nothing to train.")
    used = torch.unique(torch.cat([b for e in schedule for b in e]))  # sorted
    row_of = torch.full((len(train_loader.dataset),), -1, dtype=torch.long)
    row_of[used] = torch.arange(used.numel())
    ordered = DataLoader(
        Subset(train_loader.dataset, used.tolist()),
        batch_size=train_loader.batch_size or 1,
        shuffle=False,
        num_workers=train_loader.num_workers,
        collate_fn=train_loader.collate_fn,
    )
    dataset, collate = train_loader.dataset, train_loader.collate_fn
    first = next(iter(DataLoader(Subset(dataset, used[:1].tolist()), collate_fn=collate)))
    # Text batches with an attention mask: padded tokens are left out of the slice losses,
    # as in the normal mode (the mask is read from each replayed batch).
    masked = attention_mask(task.model_inputs(first)) is not None
    if config.verify and len(block_paths) > 1:
        verify_chain(teacher_access, block_paths, task.model_inputs(first))

    # Created only now, so that bad input found above leaves nothing behind.
    temporary = config.work_dir is None
    work_dir = (
        Path(tempfile.mkdtemp(prefix="tnexp-blockwise-")) if temporary else Path(config.work_dir)
    )
    work_dir.mkdir(parents=True, exist_ok=True)
    spill = work_dir / "activations"
    live_stores: list[Any] = []

    def new_store(name: str) -> Any:
        store = (
            DiskStore(spill / f"{name}.bin", used.numel())
            if config.offload == "disk"
            else MemoryStore(used.numel())
        )
        live_stores.append(store)
        return store

    probe = PrefixProbe(teacher, block_paths[0])
    try:
        spill.mkdir(exist_ok=True)
        streams, constant_kwargs = _prefix_pass(
            probe, teacher, student_model, rest, ordered, task, source, new_store
        )
        dynamic = has_tensor(constant_kwargs)

        def kwargs_for(rows_raw: Any) -> dict[str, Any]:
            if not dynamic:
                return constant_kwargs
            return probe(task.model_inputs(rows_raw))[1]

        def raw_batch(indices: torch.Tensor) -> Any:
            return collate([dataset[i] for i in indices.tolist()])

        def mask_for(rows_raw: Any) -> torch.Tensor | None:
            return attention_mask(task.model_inputs(rows_raw))

        # ---------------------------------------------------------------- resume bookkeeping
        stage_dir = work_dir / "stages"
        stage_dir.mkdir(exist_ok=True)
        manifest = StageManifest(
            work_dir,
            setup_fingerprint(
                {
                    "plan": plan.to_dict(),
                    "stages": [s.to_dict() for s in stages],
                    "local": dataclasses.asdict(local),
                    "schedule": [[b.tolist() for b in e] for e in schedule],
                    "tensorize": (spec.to_dict() if isinstance(spec, TensorizeSpec) else None)
                    or (report.to_dict() if report is not None else None),
                    "offload": config.offload,
                    "precision": config.precision,
                    "clip": [config.gradient_clip_val, config.gradient_clip_algorithm],
                    "identity": dict(identity or {}),
                    # stages trained before the losses honoured the mask are not reused
                    **({"attention_mask": True} if masked else {}),
                }
            ),
            config.resume,
        )

        # ---------------------------------------------------------------- per stage
        timer = OptimizationTimer(monitor="blockwise", mode="min")
        timer.on_fit_start(None, None)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        stats: list[StageStats] = []
        student_blocks: dict[str, nn.Module] = {}  # disk mode: trained blocks, weights on disk
        stage_files: dict[int, Path] = {}
        run_log = RunLog(timer, loggers)
        for stage in stages:
            stat = StageStats(stage)
            stats.append(stat)
            disk_student = config.offload == "disk" and tensorized_stage[stage.index]
            if stage.index > last_trained and not disk_student:
                continue  # after the last slice, nothing to train, propagate or tensorize
            started = time.perf_counter()
            t_shell = StageShell(teacher, stage.blocks)
            teacher_access.put(t_shell, device)
            if config.offload == "cpu":
                s_shell = StageShell(student_model, stage.blocks)
                if stage.slices or source == "student":
                    s_shell.to(device)
            elif disk_student:
                with torch.no_grad():
                    spec_here = _stage_spec(spec, t_shell, per_layer_cr)
                    s_shell, stage_report = tensorize(t_shell, spec_here, stats=grams)
                layer_reports.update({layer.name: layer for layer in stage_report.layers})
            else:
                s_shell = t_shell  # a dense block: the student's is the teacher's
            s_shell.eval()
            file = stage_dir / f"{stage.index:04d}-{_slug(stage.name)}.safetensors"
            done = manifest.done(stage.name)
            if stage.slices and done and file.is_file() and config.resume:
                materialize(s_shell, WeightsFile(file), device)
                stat.resumed, stat.losses, stat.steps = True, done["losses"], done["steps"]
                log.info("stage %s: resumed from %s", stage.name, file)
            elif stage.slices:
                data = StageData(
                    streams,
                    row_of,
                    schedule,
                    kwargs_for,
                    raw_batch if dynamic or masked else None,
                    mask_for if masked else None,
                )
                train_stage(stage, t_shell, s_shell, data, local, device, config, stat, run_log)
            if stage.slices or disk_student:
                _save_stage(s_shell, file)
                stat.file = str(file)
                stage_files[stage.index] = file
                if stage.slices and not stat.resumed:
                    manifest.record(stat, file)
            if stage.index < last_trained:
                streams = _propagate(
                    stage,
                    t_shell,
                    s_shell,
                    streams,
                    ordered,
                    kwargs_for,
                    dynamic,
                    device,
                    new_store,
                )
            teacher_access.take_back(t_shell)
            if disk_student:
                release(s_shell)
                for path in stage.blocks:
                    student_blocks[path] = s_shell.get_submodule(path)
            elif config.offload == "cpu":
                s_shell.to(HOST)
            _trim_host_memory()
            stat.seconds = time.perf_counter() - started
            if device.type == "cuda":
                stat.peak_device_bytes = int(torch.cuda.max_memory_allocated(device))
    except BaseException:
        if temporary:
            shutil.rmtree(work_dir, ignore_errors=True)
        raise
    finally:
        for store in live_stores:  # every spill file, also after a failure
            store.delete()
        shutil.rmtree(spill, ignore_errors=True)
    timer.on_fit_end(None, None)

    # ---------------------------------------------------------------- report and assembly
    if report is None:
        order = {name: i for i, name in enumerate(tensorized_names)}
        layers = sorted(layer_reports.values(), key=lambda layer: order[layer.name])
        saved = sum(layer.params_before - layer.params_after for layer in layers)
        report = TensorizeReport(
            layers=layers,
            model_params_before=teacher_params,
            model_params_after=teacher_params - saved,
            overall_cr_target=spec.overall_cr,
            per_layer_cr=per_layer_cr,
            contraction=spec.contraction,
            tucker_order=spec.tucker_order,
            order_timing=spec.order_timing,
        )

    def assemble() -> nn.Module:
        if config.offload == "cpu":
            model = student_model
        else:
            model = teacher  # the skeleton becomes the student: the teacher is never copied
            for path, module in rest.items():
                set_module(model, path, module.to(HOST))
            for stage in stages:
                if stage.index in stage_files and tensorized_stage[stage.index]:
                    shell = nn.Module()
                    for path in stage.blocks:
                        set_module(model, path, student_blocks[path])
                        attach_module(shell, path, student_blocks[path])
                    materialize(shell, WeightsFile(stage_files[stage.index]), HOST)
                elif on_meta(model, stage.blocks):
                    materialize(model, weights, HOST, only=list(stage.blocks))
        model.requires_grad_(True)
        report.model_params_after = count_parameters(model)
        if temporary:
            shutil.rmtree(work_dir, ignore_errors=True)
        return model.eval()

    result = BlockwiseResult(
        report=report,
        plan=plan,
        stages=stats,
        timer=timer,
        work_dir=work_dir,
        offload=config.offload,
        device=device,
        steps_per_stage=steps_per_stage,
        teacher_params=teacher_params,
        peak_device_bytes=(
            int(torch.cuda.max_memory_allocated(device)) if device.type == "cuda" else None
        ),
        _assembler=assemble,
    )
    if config.assemble:
        result.assemble()
    return result


def _prefix_pass(
    probe: PrefixProbe,
    teacher: nn.Module,
    student_model: nn.Module | None,
    rest: Mapping[str, nn.Module],
    ordered: DataLoader,
    task: Any,
    source: str,
    new_store: Callable[[str], Any],
) -> tuple[dict[str, Any], dict[str, Any]]:
    """The first block's inputs of every used sample, stored: the teacher's and, for
    ``input_source=student``, the student's (its prefix may be tensorized too). Returns the
    stores and the first batch's extra block arguments."""
    streams = {"teacher": new_store("s000-teacher")}
    student_probe: PrefixProbe | None = None
    if source == "student":
        streams["student"] = new_store("s000-student")
        student_probe = (
            PrefixProbe(student_model, probe.first_block) if student_model is not None else probe
        )
    constant_kwargs: dict[str, Any] | None = None
    for raw in ordered:
        inputs = task.model_inputs(raw)
        x, kwargs = probe(inputs)
        if constant_kwargs is None:
            constant_kwargs = kwargs
        streams["teacher"].append(x)
        if student_probe is not None:
            # Disk mode: the student's prefix is the teacher's with its tensorized layers.
            with swapped(teacher, rest) if student_model is None else contextlib.nullcontext():
                xs, _ = student_probe(inputs)
            streams["student"].append(xs)
    for store in streams.values():
        store.finish()
    return streams, constant_kwargs or {}


def _trim_host_memory() -> None:
    """Give the host memory of the finished block back to the OS.

    Freed tensors of a few MB land in glibc's heap, which keeps them and lets the resident
    size creep up block after block; ``malloc_trim`` returns the free pages. A no-op
    where glibc is not the allocator.
    """
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def _slug(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)[:80]


def _save_stage(shell: nn.Module, file: Path) -> None:
    from safetensors.torch import save_model

    tmp = file.with_name(f".{file.name}.partial")
    save_model(shell, str(tmp))
    os.replace(tmp, file)


def _propagate(
    stage: Stage,
    t_shell: nn.Module,
    s_shell: nn.Module,
    streams: dict[str, Any],
    ordered: DataLoader,
    kwargs_for: Any,
    dynamic: bool,
    device: torch.device,
    new_store: Any,
) -> dict[str, Any]:
    """The next stage's inputs: every stored input through this stage's block(s)."""
    tag = f"s{stage.index + 1:03d}"
    nxt = {name: new_store(f"{tag}-{name}") for name in streams}
    shells = {"teacher": t_shell, "student": s_shell}
    start = 0
    with torch.no_grad():
        for raw in ordered if dynamic else batch_counts(ordered):
            count = batch_len(raw) if dynamic else raw
            kwargs = to_device(kwargs_for(raw if dynamic else None), device)
            for name, store in streams.items():
                x = store.range(start, start + count).to(device)
                nxt[name].append(shells[name](x, **kwargs))
            start += count
    for name, store in streams.items():
        store.delete()
        nxt[name].finish()
    return nxt
