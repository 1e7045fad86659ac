"""Error propagation across slices and the progressive replacement ablation (tnexp.analysis)."""

from __future__ import annotations

import copy

import pytest
import torch

from tnexp.analysis.propagation import (
    progressive_replacement,
    propagation_errors,
    replacement_order,
)
from tnexp.factory import tensorize
from tnexp.models import small_resnet
from tnexp.slicing import make_slice_plan

SPEC = {"rules": [{"pattern": "layer*.*.conv*", "cr": 0.5}]}


@pytest.fixture(scope="module")
def pair():
    torch.manual_seed(0)
    teacher = small_resnet(num_classes=10, in_channels=1, width=8).eval()
    student, _ = tensorize(teacher, SPEC)
    plan = make_slice_plan(student, "block")
    batches = [torch.randn(4, 1, 16, 16) for _ in range(3)]
    return teacher, student.eval(), plan, batches


def full_rank(teacher):
    """A student whose Tucker layers keep every rank: it reproduces the teacher."""
    convs = [
        n
        for n, m in teacher.named_modules()
        if isinstance(m, torch.nn.Conv2d) and n.startswith("layer") and ".conv" in n
    ]
    rules = [
        {
            "pattern": n,
            "ranks": [teacher.get_submodule(n).out_channels, teacher.get_submodule(n).in_channels],
        }
        for n in convs
    ]
    return tensorize(teacher, {"rules": rules})[0].eval()


def errors_of(teacher, student, plan, batches, n=3):
    return propagation_errors(
        teacher, student, plan, batches, model_inputs=lambda b: b, num_batches=n
    )


def test_full_rank_student_has_no_error(pair):
    teacher, _, _, batches = pair
    exact = full_rank(teacher)
    plan = make_slice_plan(exact, "block")
    for row in errors_of(teacher, exact, plan, batches):
        assert row.teacher_input_error < 1e-4 and row.student_input_error < 1e-4
        assert row.teacher_input_cosine == pytest.approx(1.0, abs=1e-6)
        assert row.input_error < 1e-4


def test_error_of_an_early_slice_reaches_later_slices(pair):
    teacher, student, plan, batches = pair
    exact = full_rank(teacher)
    # Only the first slice is approximate: later slices are exact given teacher inputs,
    # but their student inputs carry the first slice's error.
    first = plan.names()[0]
    mixed = copy.deepcopy(exact)
    for path in plan[first].paths:
        parent, _, child = path.rpartition(".")
        setattr(mixed.get_submodule(parent), child, copy.deepcopy(student.get_submodule(path)))
    rows = errors_of(teacher, mixed.eval(), plan, batches)
    assert [r.slice for r in rows] == plan.names() and [r.depth for r in rows] == [0, 1, 2, 3]
    assert rows[0].teacher_input_error > 1e-2
    assert rows[0].student_input_error == pytest.approx(rows[0].teacher_input_error, rel=1e-6)
    assert rows[0].input_error == 0.0 and rows[0].amplification == pytest.approx(1.0)
    for row in rows[1:]:
        assert row.teacher_input_error < 1e-4  # the slice alone is exact
        assert row.input_error > 1e-3 and row.student_input_error > 1e-3  # error arrived
        assert row.amplification > 10
        assert row.student_input_cosine < row.teacher_input_cosine


def test_errors_match_a_direct_computation(pair):
    teacher, student, plan, batches = pair
    rows = errors_of(teacher, student, plan, batches[:1], n=1)
    last = plan[plan.names()[-1]]
    # The last block's output in each model, fed through the whole network.
    outs = {}
    for key, model in (("t", teacher), ("s", student)):
        h = model.get_submodule(last.paths[0]).register_forward_hook(
            lambda _m, _a, out, key=key: outs.__setitem__(key, out.detach())
        )
        model(batches[0])
        h.remove()
    expected = float((outs["s"] - outs["t"]).norm() / outs["t"].norm())
    assert rows[-1].student_input_error == pytest.approx(expected, rel=1e-5)


def test_progressive_replacement_goes_from_teacher_to_student(pair):
    teacher, student, plan, batches = pair
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    x = batches[0]

    def distance_to_student(model):
        with torch.no_grad():
            return float((model(x) - student(x)).norm())

    steps = progressive_replacement(teacher, student, plan, distance_to_student)
    assert [s.replaced for s in steps] == list(range(len(plan) + 1))
    assert steps[0].slice is None and [s.slice for s in steps[1:]] == plan.names()
    assert steps[0].metric > 0 and steps[-1].metric < 1e-5  # all slices swapped: the student
    for k, v in teacher.state_dict().items():  # the teacher itself is untouched
        assert torch.equal(v, before[k])


def test_replacement_order(pair):
    teacher, student, plan, batches = pair
    rows = errors_of(teacher, student, plan, batches)
    by_error = replacement_order(plan, "error", rows)
    assert sorted(by_error) == sorted(plan.names())
    values = {r.slice: r.teacher_input_error for r in rows}
    assert [values[n] for n in by_error] == sorted(values.values(), reverse=True)
    assert replacement_order(plan) == plan.names()
    with pytest.raises(ValueError, match="needs the per-slice errors"):
        replacement_order(plan, "error")
    with pytest.raises(ValueError, match="unknown replacement order"):
        replacement_order(plan, "random")
    with pytest.raises(ValueError, match="not in the plan"):
        progressive_replacement(teacher, student, plan, lambda m: 0.0, order=["nope"])


def test_empty_loader_is_a_clear_error(pair):
    teacher, student, plan, _ = pair
    with pytest.raises(ValueError, match="data loader is empty"):
        errors_of(teacher, student, plan, [], n=2)
