"""Encoder models: feature-matching task, encoder FFN block slices, mask-aware losses."""

import math

import pytest
import torch

from tnexp.factory import tensorize
from tnexp.features import FeatureCapture
from tnexp.modules import LocalConfig, LocalDistillation
from tnexp.modules.losses import cosine, mse, normalized_mse
from tnexp.slicing import SlicePlan, SlicePlanError, make_slice_plan
from tnexp.tasks import CausalLMTask, FeatureMatchingTask, Task, TaskError

FFN_SPEC = {"rules": [{"pattern": "encoder.layer.*.*.dense", "cr": 0.5}]}


def tiny_bert(layers: int = 2):
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    config = BertConfig(
        hidden_size=32,
        num_hidden_layers=layers,
        num_attention_heads=2,
        intermediate_size=64,
        vocab_size=100,
        max_position_embeddings=32,
    )
    return BertModel(config).eval()


def padded_batch(batch: int = 4, length: int = 10) -> dict[str, torch.Tensor]:
    torch.manual_seed(1)
    ids = torch.randint(1, 100, (batch, length))
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0
    mask[3, 4:] = 0
    return {"input_ids": ids, "attention_mask": mask}


def with_new_padding(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    ids = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, 7)
    return {**batch, "input_ids": ids}


def test_tasks_follow_the_protocol():
    assert isinstance(FeatureMatchingTask(), Task)
    assert isinstance(CausalLMTask(), Task)


def test_causal_lm_task_names_the_fix_for_a_model_without_logits():
    with pytest.raises(TaskError, match="task=features"):
        CausalLMTask().forward(tiny_bert(1), padded_batch())


def test_block_slices_of_an_encoder_are_its_ffns_with_the_residual():
    teacher = tiny_bert()
    student, _ = tensorize(teacher, FFN_SPEC)
    plan = make_slice_plan(student, "block")
    assert [s.paths for s in plan] == [
        ("encoder.layer.0.intermediate", "encoder.layer.0.output"),
        ("encoder.layer.1.intermediate", "encoder.layer.1.output"),
    ]
    assert all(s.residual for s in plan)
    assert SlicePlan.from_dict(plan.to_dict()).slices == plan.slices
    features = FeatureCapture(teacher, plan)(padded_batch())
    for s in plan:  # the teacher's slice replayed on its captured input gives its output
        f = features[s.name]
        torch.testing.assert_close(s.forward(teacher, f.input, **f.kwargs), f.output)
    # Without the residual the replay is wrong, and the capture refuses such a group.
    bare = SlicePlan([{"name": "g", "paths": list(plan[0].paths)}])
    with pytest.raises((SlicePlanError, TypeError)):
        FeatureCapture(teacher, bare)(padded_batch())


def test_block_pattern_slices():
    student, _ = tensorize(tiny_bert(), FFN_SPEC)
    plan = make_slice_plan(student, "block:encoder.layer.*")
    assert plan.names() == ["encoder.layer.0", "encoder.layer.1"]
    with pytest.raises(SlicePlanError, match="no module path matches"):
        make_slice_plan(student, "block:decoder.*")


@pytest.mark.parametrize("loss", [mse, normalized_mse, cosine])
def test_masked_losses_ignore_padded_positions(loss):
    torch.manual_seed(0)
    s, t = torch.randn(3, 5, 4), torch.randn(3, 5, 4)
    mask = torch.ones(3, 5, dtype=torch.long)
    mask[0, 3:] = 0
    changed = s.clone()
    changed[0, 3:] += 10.0
    assert torch.allclose(loss(s, t, mask), loss(changed, t, mask))
    assert not torch.allclose(loss(s, t), loss(changed, t))
    full = torch.ones_like(mask)
    torch.testing.assert_close(loss(s, t, full), loss(s, t))  # all ones: the plain loss


def test_local_and_global_losses_are_unchanged_by_padded_token_inputs(monkeypatch):
    teacher = tiny_bert()
    student, _ = tensorize(teacher, FFN_SPEC)
    plan = make_slice_plan(student, "block")
    batches = (padded_batch(), with_new_padding(padded_batch()))
    task = FeatureMatchingTask()
    module = LocalDistillation(student, task, teacher=teacher, plan=plan)
    module.setup("fit")
    local = [module._local_step(b).item() for b in batches]
    assert math.isclose(*local, rel_tol=1e-6)
    glob = [task.loss(task.forward(student, b), b).item() for b in batches]
    assert math.isclose(*glob, rel_tol=1e-6)
    # The check can fail: with the mask dropped, the padded positions change the loss.
    monkeypatch.setattr("tnexp.modules.tensorization.attention_mask", lambda inputs: None)
    unmasked = [module._local_step(b).item() for b in batches]
    assert not math.isclose(*unmasked, rel_tol=1e-3)


def test_slice_validation_errors_are_unchanged_by_padded_token_inputs(monkeypatch):
    teacher = tiny_bert()
    student, _ = tensorize(teacher, FFN_SPEC)
    module = LocalDistillation(
        student, FeatureMatchingTask(), teacher=teacher, plan=make_slice_plan(student, "block")
    )
    module.setup("fit")

    def slice_errors(batch):
        module._accumulate_slice_errors(batch)  # what val/slice_rel_err/<slice> is made of
        sums = module.__dict__.pop("_slice_error_sums")
        return [math.sqrt(err / ref) for err, ref in sums.values()]

    batches = (padded_batch(), with_new_padding(padded_batch()))
    masked = [slice_errors(b) for b in batches]
    assert len(masked[0]) == 2 and all(e > 0.0 for e in masked[0])
    assert masked[0] == pytest.approx(masked[1], rel=1e-6)
    # The check can fail: with the mask dropped, the padded positions change the errors.
    monkeypatch.setattr("tnexp.modules.tensorization.attention_mask", lambda inputs: None)
    unmasked = [slice_errors(b) for b in batches]
    assert unmasked[0] != pytest.approx(unmasked[1], rel=1e-3)


def test_feature_task_metrics():
    teacher = tiny_bert()
    task = FeatureMatchingTask(output="pooled", teacher=teacher)
    batch = padded_batch()
    metrics = task.make_metrics()
    outputs = task.forward(teacher, batch)  # the teacher against itself: perfect
    task.update_metrics(metrics, outputs, batch, task.loss(outputs, batch))
    values = task.finalize(metrics.compute())
    assert values["rel_err"] == pytest.approx(0.0, abs=1e-6)
    assert values["cosine"] == pytest.approx(1.0, abs=1e-6)
    assert values["sim_corr"] == pytest.approx(1.0, abs=1e-6)
    student, _ = tensorize(teacher, {"rules": [{"pattern": "encoder.**.dense", "cr": 0.8}]})
    metrics.reset()
    outputs = task.forward(student, batch)
    task.update_metrics(metrics, outputs, batch, task.loss(outputs, batch))
    worse = task.finalize(metrics.compute())
    assert worse["rel_err"] > 0.01 and worse["cosine"] < 1.0 and worse["sim_corr"] < 1.0
    # the pooled embedding ignores padded tokens
    again = task.forward(student, with_new_padding(batch))
    torch.testing.assert_close(again.student, outputs.student)


def test_feature_task_names_missing_outputs():
    task = FeatureMatchingTask(output="logits", teacher=tiny_bert(1))
    with pytest.raises(TaskError, match="last_hidden_state"):
        task.forward(tiny_bert(1), padded_batch())
    with pytest.raises(Exception, match="teacher"):
        FeatureMatchingTask().forward(tiny_bert(1), padded_batch())


def test_local_config_loss_choice_still_validated():
    with pytest.raises(ValueError, match="unknown distillation loss"):
        LocalConfig(loss="l1")


@pytest.mark.parametrize(
    ("model_type", "spec_pattern", "paths"),
    [
        (
            "roberta",
            "encoder.layer.*.*.dense",
            ("encoder.layer.0.intermediate", "encoder.layer.0.output"),
        ),
        ("vit", "layers.*.mlp.fc*", ("layers.0.mlp",)),
    ],
)
def test_block_slices_of_other_encoders_replay_the_teacher(model_type, spec_pattern, paths):
    from tnexp.models.hf import tiny_hf_model

    kwargs = {"image_size": 8, "patch_size": 4, "num_channels": 1} if model_type == "vit" else {}
    teacher = tiny_hf_model(
        model_type,
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=32,
        **kwargs,
    )
    student, _ = tensorize(teacher, {"rules": [{"pattern": spec_pattern, "cr": 0.5}]})
    plan = make_slice_plan(student, "block")
    assert plan[0].paths == paths and len(plan) == 2
    inputs = torch.randn(2, 1, 8, 8) if model_type == "vit" else padded_batch()
    features = FeatureCapture(teacher, plan)(inputs)
    for s in plan:
        f = features[s.name]
        torch.testing.assert_close(s.forward(teacher, f.input, **f.kwargs), f.output)


def test_groups_of_encoder_layers_replay_the_teacher():
    teacher = tiny_bert(layers=4)
    student, _ = tensorize(teacher, FFN_SPEC)
    plan = make_slice_plan(student, "group:2")
    assert [s.paths for s in plan] == [
        ("encoder.layer.0", "encoder.layer.1"),
        ("encoder.layer.2", "encoder.layer.3"),
    ]
    features = FeatureCapture(teacher, plan)(padded_batch())
    for s in plan:  # the attention mask reaches every layer of the group
        f = features[s.name]
        torch.testing.assert_close(s.forward(teacher, f.input, **f.kwargs), f.output)


def _cached_batch(tmp_path, name, teacher, plan, batch):
    from tnexp.features import collate_features, open_feature_cache, write_feature_cache

    directory = tmp_path / name
    write_feature_cache(
        directory, teacher, plan, [batch], dataset_identity={"n": name}, dtype="float32"
    )
    cache = open_feature_cache(directory)
    return cache, collate_features([cache[i] for i in range(len(cache))])


def test_cached_text_features_keep_the_attention_mask(tmp_path, monkeypatch):
    """Training from the cache leaves padded positions out, as online training does."""
    teacher = tiny_bert()
    student, _ = tensorize(teacher, FFN_SPEC)
    plan = make_slice_plan(student, "block")
    module = LocalDistillation(student, FeatureMatchingTask(), teacher=teacher, plan=plan)
    module.setup("fit")
    batches = (padded_batch(), with_new_padding(padded_batch()))
    cached = [_cached_batch(tmp_path, f"c{i}", teacher, plan, b) for i, b in enumerate(batches)]
    cache, first = cached[0]
    assert cache.has_masks and cache.manifest.attention_mask == {
        "dtype": "torch.int64",
        "shape": [10],
    }
    torch.testing.assert_close(first[2], batches[0]["attention_mask"])
    from_cache = [module._local_step(batch).item() for _, batch in cached]
    assert math.isclose(*from_cache, rel_tol=1e-6)
    assert math.isclose(from_cache[0], module._local_step(batches[0]).item(), rel_tol=1e-5)
    # The check can fail: without the cached mask the padded positions change the loss.
    unmasked = [module._local_step(batch[:2]).item() for _, batch in cached]
    assert not math.isclose(*unmasked, rel_tol=1e-3)


def test_a_version_1_cache_is_read_but_refused_for_padded_text(tmp_path):
    import json

    from tnexp.features import FeatureCacheError, open_feature_cache

    teacher = tiny_bert()
    student, _ = tensorize(teacher, FFN_SPEC)
    plan = make_slice_plan(student, "block")
    cache, _ = _cached_batch(tmp_path, "v1", teacher, plan, padded_batch())
    manifest = tmp_path / "v1" / "manifest.json"
    data = json.loads(manifest.read_text())
    data["format_version"] = 1  # what tnexp wrote before masks were stored
    del data["attention_mask"]
    manifest.write_text(json.dumps(data))
    old = open_feature_cache(tmp_path / "v1")
    assert not old.has_masks and not old.manifest.masks_recorded
    assert "attention_mask" not in old.manifest.to_dict()  # its hash stays what it was
    features, label = old[0]
    assert set(features) == set(plan.names()) and label is None
    old.check_masks(False)  # image-like data: nothing to miss
    with pytest.raises(FeatureCacheError, match=r"format version 1.*rm -rf"):
        old.check_masks(True)
    cache.check_masks(True)  # a version-2 cache of the same batches has them
