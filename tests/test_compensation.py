"""Error compensation inside slices (tnexp.compensation): stages, exactness, monotonicity."""

from __future__ import annotations

import copy

import pytest
import torch

from tnexp.analysis.propagation import propagation_errors
from tnexp.calibration import collect_input_stats
from tnexp.compensation import compensate_slices, slice_stages
from tnexp.factory import TensorizeSpec, plan_layers, tensorize
from tnexp.models import small_resnet
from tnexp.slicing import make_slice_plan


def tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    return LlamaForCausalLM(config).eval()


LLAMA_SPEC = {
    "rules": [
        {
            "pattern": "model.layers.*.mlp.*_proj",
            "method": "mpo",
            "cr": 0.6,
            "layout": "lowrank",
            "init": "whiten",
        }
    ]
}
RESNET_SPEC = {"rules": [{"pattern": "layer*.*.conv*", "cr": 0.6, "init": "als"}]}


def data_aware(teacher, spec, batches, model_inputs=lambda b: b):
    names = [p.name for p in plan_layers(teacher, TensorizeSpec.from_config(spec))]
    stats = collect_input_stats(
        teacher, names, batches, model_inputs=model_inputs, num_batches=len(batches)
    )
    return tensorize(teacher, spec, stats=stats)[0].eval()


def skewed_images(n=6, seed=0):
    """Inputs with a strongly non-isotropic distribution (what makes data-aware fits matter)."""
    g = torch.Generator().manual_seed(seed)
    scale = torch.linspace(0.1, 3.0, 16)[None, None, :, None]
    return [torch.randn(8, 1, 16, 16, generator=g) * scale for _ in range(n)]


def token_batches(n=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [{"input_ids": torch.randint(0, 64, (4, 16), generator=g)} for _ in range(n)]


def test_stages_follow_the_data_flow():
    teacher = tiny_llama()
    student = data_aware(teacher, LLAMA_SPEC, token_batches(), model_inputs=lambda b: b)
    plan = make_slice_plan(student, "block")
    stages = slice_stages(teacher, student, plan, token_batches(1)[0])
    mlp = "model.layers.0.mlp"
    assert stages[mlp] == [[f"{mlp}.gate_proj", f"{mlp}.up_proj"], [f"{mlp}.down_proj"]]

    resnet = small_resnet(width=8, blocks=(1, 1, 1, 1)).eval()
    tucker = data_aware(resnet, RESNET_SPEC, skewed_images())
    plan = make_slice_plan(tucker, "block")
    stages = slice_stages(resnet, tucker, plan, skewed_images(1)[0])
    assert stages["layer1.0"] == [["layer1.0.conv1"], ["layer1.0.conv2"]]


@pytest.mark.parametrize("which", ["llama", "resnet"])
def test_compensation_lowers_the_slice_error_and_never_raises_a_layer_error(which):
    if which == "llama":
        teacher, spec, batches = tiny_llama(), LLAMA_SPEC, token_batches(6)
    else:
        teacher, spec, batches = small_resnet(width=8).eval(), RESNET_SPEC, skewed_images()
    student = data_aware(teacher, spec, batches)
    plan = make_slice_plan(student, "block")
    before = propagation_errors(
        teacher, student, plan, batches, model_inputs=lambda b: b, num_batches=len(batches)
    )
    untouched = copy.deepcopy(student)
    result = compensate_slices(
        teacher, student, plan, batches, model_inputs=lambda b: b, num_batches=len(batches)
    )
    assert result.stages == 2 and result.layers
    for name, row in result.layers.items():
        assert row["stage"] == 1 and row["after"] <= row["before"] + 1e-12, name
    assert any(row["after"] < 0.99 * row["before"] for row in result.layers.values())
    # Only later-stage layers change: the first stage saw the teacher's inputs already.
    for name, param in student.named_parameters():
        changed = not torch.equal(param, untouched.get_parameter(name))
        assert changed == any(name.startswith(layer + ".") for layer in result.layers), name
    after = propagation_errors(
        teacher, student, plan, batches, model_inputs=lambda b: b, num_batches=len(batches)
    )
    mean = lambda rows: sum(r.teacher_input_error for r in rows) / len(rows)  # noqa: E731
    assert mean(after) < mean(before)


def test_full_rank_refit_reaches_the_least_squares_optimum():
    # down_proj kept at full rank: the refit must reach min ||X_s W' - X_t W|| exactly
    # (computed here directly with lstsq on the same rows).
    teacher = tiny_llama()
    rule = LLAMA_SPEC["rules"][0]
    rules = [
        {**rule, "pattern": "model.layers.*.mlp.gate_proj"},
        {**rule, "pattern": "model.layers.*.mlp.up_proj"},
        {**rule, "pattern": "model.layers.*.mlp.down_proj", "cr": None, "bond_dim": 32},
    ]
    batches = token_batches(6)
    student = data_aware(teacher, {"rules": rules}, batches)
    mlp_t, mlp_s = teacher.model.layers[0].mlp, student.model.layers[0].mlp
    xs, xt = [], []
    hooks = [
        mlp_t.register_forward_pre_hook(
            lambda _m, a: xs.append(mlp_s.act_fn(mlp_s.gate_proj(a[0])) * mlp_s.up_proj(a[0]))
        ),
        mlp_t.down_proj.register_forward_pre_hook(lambda _m, a: xt.append(a[0])),
    ]
    with torch.no_grad():
        for batch in batches:
            teacher(**batch)
    for h in hooks:
        h.remove()
    a = torch.cat([x.detach().reshape(-1, 64) for x in xs]).double()
    b = torch.cat([x.reshape(-1, 64) for x in xt]).double() @ mlp_t.down_proj.weight.T.double()
    best = torch.linalg.lstsq(a, b).solution
    optimum = float((a @ best - b).norm() / b.norm())
    plan = make_slice_plan(student, "block")
    result = compensate_slices(
        teacher, student, plan, batches, model_inputs=lambda b: b, num_batches=6, damping=1e-10
    )
    row = result.layers["model.layers.0.mlp.down_proj"]
    assert row["after"] == pytest.approx(optimum, rel=1e-3, abs=1e-6)
    assert row["after"] < row["before"]


def test_no_batches_is_a_clear_error():
    teacher = small_resnet(width=8).eval()
    student = data_aware(teacher, RESNET_SPEC, skewed_images())
    plan = make_slice_plan(student, "block")
    with pytest.raises(Exception, match="no calibration batch"):
        compensate_slices(teacher, student, plan, [], model_inputs=lambda b: b, num_batches=2)


def _logit_error(teacher, student, batches):
    with torch.no_grad():
        diffs = [
            (student(**b).logits - teacher(**b).logits).norm() / teacher(**b).logits.norm()
            for b in batches
        ]
    return float(sum(diffs) / len(diffs))


def test_chained_compensation_fits_every_stage_to_the_students_own_inputs():
    teacher = tiny_llama()
    batches = token_batches(6)
    student = data_aware(teacher, LLAMA_SPEC, batches)
    plan = make_slice_plan(student, "decoder")
    per_slice = copy.deepcopy(student)
    compensate_slices(
        teacher,
        per_slice,
        make_slice_plan(per_slice, "block"),
        batches,
        model_inputs=lambda b: b,
        num_batches=len(batches),
    )
    untouched = copy.deepcopy(student)
    result = compensate_slices(
        teacher, student, plan, batches, model_inputs=lambda b: b, num_batches=6, chain=True
    )
    first, second = "model.layers.0.mlp", "model.layers.1.mlp"
    # The first slice's first stage sees the teacher's inputs: left as the init made it.
    assert f"{first}.gate_proj" not in result.layers
    assert torch.equal(
        student.get_submodule(f"{first}.gate_proj").cores[0],
        untouched.get_submodule(f"{first}.gate_proj").cores[0],
    )
    # Later slices' first stage is refitted too (their inputs carry the first slice's error).
    for name in (f"{second}.gate_proj", f"{second}.up_proj", f"{second}.down_proj"):
        assert result.layers[name]["after"] <= result.layers[name]["before"] + 1e-12, name
    assert result.layers[f"{second}.gate_proj"]["stage"] == 0
    assert any(
        row["after"] < 0.99 * row["before"]
        for name, row in result.layers.items()
        if name.startswith(second)
    )
    # End to end, the chained student is closer to the teacher than the per-slice one.
    assert _logit_error(teacher, student, batches) < _logit_error(teacher, per_slice, batches)


def test_chained_compensation_refuses_slices_that_do_not_chain():
    teacher = tiny_llama()
    batches = token_batches(2)
    student = data_aware(teacher, LLAMA_SPEC, batches)
    plan = make_slice_plan(student, "block")  # MLPs only: attention runs between them
    with pytest.raises(Exception, match="chain"):
        compensate_slices(
            teacher, student, plan, batches, model_inputs=lambda b: b, num_batches=2, chain=True
        )
