"""The training core: modules, Hydra app stages, results, resume, W&B, bad input."""

import json
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from stages import FAST, make_cfg

from tnexp.config import CONFIG_DIR
from tnexp.factory import tensorize
from tnexp.models import small_resnet
from tnexp.modules import LocalConfig, LocalDistillation, NonFiniteLossError
from tnexp.results import SCHEMA_VERSION, read_results
from tnexp.run import run_stage
from tnexp.slicing import make_slice_plan
from tnexp.stages.build import load_teacher
from tnexp.tasks import ClassificationTask


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("teacher")
    results = run_stage(make_cfg(out, "method=pretrain", "trainer.limit_train_batches=8"))
    assert (out / "teacher.safetensors").is_file()
    assert results["method"] == "pretrain"
    return out


@pytest.mark.parametrize("method", ["local", "global", "hybrid"])
def test_stage_runs_and_writes_results(teacher_dir, tmp_path, method):
    extra = ["method.local_epochs=1", "trainer.max_epochs=2"] if method == "hybrid" else []
    results = run_stage(
        make_cfg(tmp_path, f"method={method}", f"teacher.path={teacher_dir}", *extra)
    )
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["method"] == method
    for key in ("config", "metrics", "time", "tensorize", "params", "weights", "runtime"):
        assert key in saved, key
    assert saved["runtime"]["threads"] == saved["runtime"]["threads_in_use"] >= 1
    assert 0.0 <= saved["metrics"]["best"]["val/top1"] <= 100.0
    assert "val/top5" in saved["metrics"]["final"]
    assert saved["time"]["optimization_s"] > 0
    assert saved["time"]["time_to_best_s"] is not None
    assert saved["tensorize"]["totals"]["num_layers"] == 8
    assert abs(saved["tensorize"]["layers"][0]["cr"] - 0.5) < 0.1
    assert (tmp_path / "student" / "model.safetensors").is_file()
    assert (tmp_path / "checkpoints" / "last.ckpt").is_file()
    assert list((tmp_path / "csv").glob("**/metrics.csv"))
    assert results["global_step"] == saved["global_step"] > 0
    # the versioned schema (tnexp/results.py), read back whole
    assert saved["schema_version"] == SCHEMA_VERSION and saved["status"] == "ok"
    assert saved["run_name"] == f"{method}-cr0.5" and saved["data"]["name"]
    assert read_results(tmp_path).to_dict() == saved == results
    if method == "hybrid":
        metrics = (next((tmp_path / "csv").glob("**/metrics.csv"))).read_text()
        assert "train/slice/" in metrics  # the local epoch logged per-slice losses


@pytest.mark.parametrize("method", ["local", "global"])
def test_the_methods_batch_size_is_used_from_the_first_epoch(teacher_dir, tmp_path, method):
    # 40 training images: 5 steps at the method's batch size 8, 1 at the data's 64.
    cfg = make_cfg(
        tmp_path,
        f"method={method}",
        f"teacher.path={teacher_dir}",
        "trainer.limit_train_batches=null",
        "data.train_subset=40",
        "data.batch_size=64",
        f"method.{method}.batch_size=8",
    )
    assert run_stage(cfg)["global_step"] == 5


def test_local_logs_per_slice_losses(teacher_dir, tmp_path):
    run_stage(
        make_cfg(tmp_path, "method=local", f"teacher.path={teacher_dir}", "method.slicing=layer")
    )
    header = next((tmp_path / "csv").glob("**/metrics.csv")).read_text().splitlines()[0]
    assert header.count("train/slice/") >= 8  # 8 tensorized layers, per step and epoch


def test_resume_continues_from_last_checkpoint(teacher_dir, tmp_path):
    first = run_stage(make_cfg(tmp_path, "method=global", f"teacher.path={teacher_dir}"))
    second = run_stage(
        make_cfg(
            tmp_path,
            "method=global",
            f"teacher.path={teacher_dir}",
            "trainer.max_epochs=2",
            "resume=auto",
        )
    )
    assert second["global_step"] == 2 * first["global_step"]
    # The optimisation timer resumes its accumulated time too.
    assert second["time"]["optimization_s"] > first["time"]["optimization_s"]
    assert len(second["time"]["history"]) == 2


def test_wandb_offline_run_directory(teacher_dir, tmp_path):
    results = run_stage(
        make_cfg(
            tmp_path,
            "method=global",
            f"teacher.path={teacher_dir}",
            "logger=default",
            "experiment_name=table1",
        )
    )
    runs = list((tmp_path / "wandb").glob("offline-run-*"))
    assert runs, "no offline W&B run directory"
    assert results["experiment"] == "table1"


def test_teacher_mismatch_is_a_clear_error(teacher_dir, tmp_path):
    cfg = make_cfg(tmp_path, "method=local", f"teacher.path={teacher_dir}", "model.width=16")
    with pytest.raises(ValueError, match="does not match model"):
        load_teacher(cfg)


def test_missing_teacher_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="method=pretrain"):
        run_stage(make_cfg(tmp_path, "method=local"))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        run_stage(make_cfg(tmp_path, "method=local", f"teacher.path={tmp_path / 'nope'}"))


# ---------------------------------------------------------------- module-level behaviour
def _local_module(slices=None, input_source="teacher", loss="mse"):
    torch.manual_seed(0)
    teacher = small_resnet(width=8).eval()
    student, _ = tensorize(
        teacher, {"rules": [{"pattern": "layer*.*.conv*", "cr": 0.5, "init": "random"}]}
    )
    plan = make_slice_plan(student, "block")
    if slices is not None:
        plan = plan.select(slices)
    module = LocalDistillation(
        student,
        ClassificationTask(10),
        teacher=teacher,
        plan=plan,
        local=LocalConfig(input_source=input_source, loss=loss),
    )
    module.setup("fit")
    module._set_train_modes("local")
    return module


def _slice_grads(module, name):
    s = module.plan[name]
    return [p.grad.clone() for p in s.parameters(module.student)]


def test_slice_gradients_independent_of_other_slices():
    batch = (torch.randn(4, 1, 8, 8), torch.randint(0, 10, (4,)))
    full = _local_module()
    full._local_step(batch).backward()
    name = full.plan.names()[1]
    alone = _local_module(slices=[name])
    alone._local_step(batch).backward()
    for a, b in zip(_slice_grads(full, name), _slice_grads(alone, name), strict=True):
        torch.testing.assert_close(a, b)


def test_student_input_source_differs_from_teacher_input():
    batch = (torch.randn(4, 1, 8, 8), torch.randint(0, 10, (4,)))
    losses = {}
    for source in ("teacher", "student"):
        module = _local_module(input_source=source)
        losses[source] = module._local_step(batch).item()
    assert losses["teacher"] != pytest.approx(losses["student"])


@pytest.mark.parametrize("loss", ["mse", "normalized_mse", "cosine"])
def test_distillation_losses_are_zero_for_the_teacher_itself(loss):
    from tnexp.modules import get_distillation_loss

    x = torch.randn(3, 4, 5)
    assert float(get_distillation_loss(loss)(x, x)) == pytest.approx(0.0, abs=1e-6)
    assert float(get_distillation_loss(loss)(x + torch.randn_like(x), x)) > 0


def test_nan_loss_names_the_slice():
    module = _local_module()
    batch = (torch.full((2, 1, 8, 8), float("nan")), torch.zeros(2, dtype=torch.long))
    with pytest.raises(NonFiniteLossError, match=r"slice 'layer1\.0'.*step 0"):
        module._local_step(batch)


def test_cached_and_online_give_the_same_losses(tmp_path):
    from tnexp.features import open_feature_cache, teacher_fingerprint, write_feature_cache

    module = _local_module()
    x = torch.randn(6, 1, 8, 8)
    y = torch.randint(0, 10, (6,))
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=6)
    write_feature_cache(
        tmp_path / "c",
        module.teacher,
        module.plan,
        loader,
        dtype="float32",
        dataset_identity={"name": "t"},
        progress=False,
    )
    cache = open_feature_cache(
        tmp_path / "c",
        teacher_fingerprint=teacher_fingerprint(module.teacher),
        dataset_identity={"name": "t"},
        plan=module.plan,
        dtype="float32",
    )
    from tnexp.features import collate_features

    cached_batch = collate_features([cache[i] for i in range(6)])
    online = float(module._local_step((x, y)))
    cached = float(module._local_step(cached_batch))
    assert online == pytest.approx(cached, rel=1e-6)


def test_cached_local_stage_runs(teacher_dir, tmp_path):
    results = run_stage(
        make_cfg(
            tmp_path,
            "method=local",
            f"teacher.path={teacher_dir}",
            "method.features=cached",
            "method.cache.dtype=float32",
        )
    )
    assert results["time"]["optimization_s"] > 0
    assert list((tmp_path / "cache").glob("*/manifest.json"))


# ---------------------------------------------------------------- configs
# Pretrained hub/GGUF checkpoints (downloaded or dequantized when instantiated).
HF_CHECKPOINT_MODELS = {"gpt2", "gpt2_xl", "smollm2_135m", "hf"}


def _options(group: str) -> list[str]:
    return sorted(p.stem for p in (Path(CONFIG_DIR) / group).glob("*.yaml"))


@pytest.mark.parametrize(
    "group",
    [
        "data",
        "model",
        "tensorize",
        "method",
        "task",
        "trainer",
        "logger",
        "callbacks",
        "paths",
        "runtime",
        "experiment",
    ],
)
def test_every_config_composes_and_instantiates(group, tmp_path):
    from tnexp.stages.build import build_datamodule, build_model
    from tnexp.stages.student import tensorize_spec

    for option in _options(group):
        override = f"{group}={option}"
        cfg = make_cfg(tmp_path, override, fast=False)
        # Text data interpolates the model's tokenizer and vice versa: pair LM with LM.
        if group == "data" and cfg.data.info.get("task") == "causal_lm":
            cfg = make_cfg(tmp_path, override, "model=tiny_gpt2", fast=False)
        if group == "model" and "tokenizer" in cfg.model:
            cfg = make_cfg(tmp_path, override, "data=stdlib_text", fast=False)
        OmegaConf.to_container(cfg, resolve=True)  # every interpolation resolves
        assert build_datamodule(cfg) is not None
        if group == "model" and option in HF_CHECKPOINT_MODELS:
            continue  # weights load at instantiation: covered by tests/test_hf_models.py
        assert isinstance(build_model(cfg), torch.nn.Module)
        if cfg.tensorize.rules:
            tensorize_spec(cfg)


def test_unknown_method_is_hydras_error(tmp_path):
    from hydra.errors import ConfigCompositionException

    with pytest.raises(ConfigCompositionException, match="method"):
        make_cfg(tmp_path, "method=distill")


# ---------------------------------------------------------------- language models
LM_FAST = [o for o in FAST if not o.startswith(("data.", "model."))]
LM = [
    "model=tiny_gpt2",
    "data=stdlib_text",
    "tensorize=mpo_gpt2_mlp",
    "tensorize.overall_cr=null",
    "+tensorize.rules.0.cr=0.5",
    "data.seq_len=32",
    "data.num_sequences=16",
    "data.num_val_sequences=4",
    "eval.perplexity.max_tokens=128",
]


@pytest.mark.slow  # end to end: in `uv run pytest -m slow` (.ci/run), not the default suite
def test_lm_pretrain_then_local_with_tied_weights(tmp_path):
    run_stage(make_cfg(tmp_path / "t", "method=pretrain", *LM_FAST, *LM[:2], *LM[5:], fast=False))
    results = run_stage(
        make_cfg(
            tmp_path / "s",
            "method=local",
            *LM_FAST,
            *LM,
            f"teacher.path={tmp_path / 't'}",
            fast=False,
        )
    )
    metrics = results["metrics"]
    for stage in ("before", "final_eval", "teacher"):
        assert metrics[stage]["token_ppl"] > 1.0 and metrics[stage]["ppl_tokens"] == 127
    assert "val/ppl" in metrics["final"]
    assert results["tensorize"]["layers"][0]["module_type"] == "Conv1D"


def test_local_objective_sums_slices_passes_the_mask_and_names_a_nan_slice():
    from tnexp.features import FeatureCapture
    from tnexp.modules.objective import FeaturePair, LocalObjective, feature_pairs

    torch.manual_seed(0)
    teacher = small_resnet(width=8).eval()
    student, _ = tensorize(teacher, {"rules": [{"pattern": "layer*.*.conv*", "cr": 0.5}]})
    plan = make_slice_plan(student, "block")
    pairs = feature_pairs(FeatureCapture(teacher, plan)(torch.randn(2, 1, 8, 8)))
    masks = []

    def loss(prediction, target, mask=None):  # a mask-aware loss (issue 15 adds real ones)
        masks.append(mask)
        return (prediction - target).pow(2).mean()

    objective = LocalObjective(plan, loss, trainable="tensorized")
    mask = torch.ones(2)
    losses = objective(student, pairs, step=0, epoch=0, mask=mask)
    assert len(masks) == len(plan) and all(m is mask for m in masks)
    assert torch.allclose(losses.total, torch.stack(list(losses.per_slice.values())).sum())
    assert set(losses.metrics()) == {f"train/slice/{n}" for n in plan.names()} | {"train/loss"}
    masks.clear()
    objective(student, pairs, step=0, epoch=0)
    assert masks == [None] * len(plan)  # no mask: two-argument losses keep working

    cores = {id(p) for s in plan for p in s.tensorized_parameters(student)}
    assert {id(p) for p in objective.freeze_others(student)} == cores
    assert all(p.requires_grad == (id(p) in cores) for p in student.parameters())
    every = LocalObjective(plan, "mse").parameters(student)
    assert cores < {id(p) for p in every}  # trainable=slice adds the slices' other parameters

    bad = {n: FeaturePair(p.input * float("nan"), p.target) for n, p in pairs.items()}
    with pytest.raises(
        NonFiniteLossError, match=r"slice 'layer1\.0' is nan at step 3 \(epoch 1, local phase\)"
    ):
        objective(student, bad, step=3, epoch=1, where=" of stage 'x'")


def test_local_step_update_equals_the_per_slice_path():
    """A local step (one summed loss, one backward, the fused Adam of configure_optimizers)
    moves every slice exactly as training each slice alone does: its own loss, its own
    backward, a per-tensor Adam (the path before issue 14)."""
    import copy

    from tnexp.features import FeatureCapture

    module = _local_module()
    reference = copy.deepcopy(module.student)  # trained slice by slice below
    teacher = module.teacher
    optimizer = module.configure_optimizers()
    assert all(group.get("fused") for group in optimizer.param_groups)
    ref_params = [p for s in module.plan for p in s.parameters(reference)]
    ref_optimizer = torch.optim.Adam(ref_params, lr=optimizer.param_groups[0]["lr"], foreach=False)
    torch.manual_seed(1)
    batches = [(torch.randn(6, 1, 8, 8), torch.randint(0, 10, (6,))) for _ in range(3)]
    for step, (x, y) in enumerate(batches):
        optimizer.zero_grad()
        module._local_step((x, y)).backward()
        ref_optimizer.zero_grad()
        features = FeatureCapture(teacher, module.plan)(x)
        for s in module.plan:
            f = features[s.name]
            loss = torch.nn.functional.mse_loss(s.forward(reference, f.input), f.output)
            same = module.last_slice_losses[s.name]  # equal up to the Adam rounding below
            assert torch.allclose(loss.detach(), same, rtol=1e-5) and (step or loss == same)
            loss.backward()  # each slice alone
        if step == 0:  # the summed loss gives each slice exactly its own gradient
            for s in module.plan:
                for p, q in zip(s.parameters(module.student), s.parameters(reference)):
                    assert torch.equal(p.grad, q.grad)
        optimizer.step()
        ref_optimizer.step()
    for s in module.plan:
        for p, q in zip(s.parameters(module.student), s.parameters(reference)):
            assert torch.allclose(p, q, rtol=1e-5, atol=1e-6)


def test_local_step_skips_the_teacher_head_and_keeps_epoch_means():
    module = _local_module()
    calls = []
    handle = module.teacher.fc.register_forward_hook(lambda *a: calls.append(1))
    try:
        first = module._local_step((torch.randn(6, 1, 8, 8), torch.randint(0, 10, (6,))))
        step1 = dict(module.last_slice_losses)
        module._local_step((torch.randn(3, 1, 8, 8), torch.randint(0, 10, (3,))))
    finally:
        handle.remove()
    assert calls == []  # the teacher forward stops at the last slice's output
    assert list(step1) == module.plan.names()
    assert float(first.detach()) == pytest.approx(float(sum(step1.values())), rel=1e-6)
    means = module.slice_loss_epoch_means()  # batch-size weighted, like Lightning's
    for name, value in means.items():
        expected = (6 * step1[name] + 3 * module.last_slice_losses[name]) / 9
        assert value == pytest.approx(float(expected), rel=1e-6)
