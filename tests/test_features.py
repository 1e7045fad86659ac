import json
import os

import pytest
import torch
from tiny_lm import small_gpt2, small_llama
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from tnexp.factory import tensorize
from tnexp.features import (
    MANIFEST_FILE,
    FeatureCacheDataset,
    FeatureCacheError,
    FeatureCacheManifest,
    FeatureCapture,
    ShardGroupedSampler,
    collate_features,
    open_feature_cache,
    teacher_fingerprint,
    write_feature_cache,
)
from tnexp.models.resnet import small_resnet
from tnexp.slicing import Slice, SlicePlan, SlicePlanError, make_slice_plan

RESNET_SPEC = {"rules": [{"pattern": "layer*.*.conv*", "cr": 0.5}]}
IDENTITY = {"name": "random", "n": 40, "seed": 0}


# ----------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def resnet():
    torch.manual_seed(0)
    teacher = small_resnet(width=8).eval()
    student, _ = tensorize(teacher, RESNET_SPEC)
    return teacher, student


@pytest.fixture(scope="module")
def images():
    g = torch.Generator().manual_seed(1)
    return torch.randn(40, 1, 16, 16, generator=g), torch.randint(0, 10, (40,), generator=g)


def loader(images, batch_size=16, fail_after=None):
    x, y = images
    dl = DataLoader(TensorDataset(x, y), batch_size=batch_size, shuffle=False)
    if fail_after is None:
        return dl

    def gen():
        for i, batch in enumerate(dl):
            if i == fail_after:
                raise RuntimeError("simulated crash mid-capture")
            yield batch

    return gen()


def count_forwards(model):
    calls = []
    handle = model.register_forward_pre_hook(lambda *_: calls.append(1))
    return calls, handle


def no_hooks(model):
    return all(
        not m._forward_hooks and not m._forward_pre_hooks and not m._forward_hooks_with_kwargs
        for m in model.modules()
    )


def paths_plan(*paths):
    return SlicePlan([Slice(p, (p,)) for p in paths])


def tiny_lm(kind):
    if kind == "gpt2":
        model, pattern = small_gpt2(), "transformer.h.*.mlp.c_*"
    else:
        model, pattern = small_llama(), "model.layers.*.mlp.*_proj"
    student, _ = tensorize(model, {"rules": [{"pattern": pattern, "cr": 0.5}]})
    return model, student


# ----------------------------------------------------------------------- online capture
@pytest.mark.parametrize("granularity", ["layer", "block", "group:2"])
def test_capture_matches_slice_replay_one_forward(resnet, images, granularity):
    teacher, student = resnet
    plan = make_slice_plan(student, granularity)
    calls, handle = count_forwards(teacher)
    try:
        with FeatureCapture(teacher, plan) as capture:
            for start in (0, 16):
                feats = capture(images[0][start : start + 16])
    finally:
        handle.remove()
    assert len(calls) == 2  # one teacher forward per batch, whatever the number of slices
    assert list(feats) == plan.names()
    for s in plan:
        f = feats[s.name]
        assert f.kwargs == {}
        assert not f.input.requires_grad and f.input.shape[0] == 16
        with torch.no_grad():
            assert torch.equal(s.forward(teacher, f.input), f.output)
    assert no_hooks(teacher)


def test_capture_inputs_outputs_flags(resnet, images):
    teacher, student = resnet
    plan = make_slice_plan(student, "block")
    feats = FeatureCapture(teacher, plan, capture_inputs=False)(images[0][:4])
    assert feats["layer1.0"].input is None and feats["layer1.0"].output is not None
    feats = FeatureCapture(teacher, plan, capture_outputs=False)(images[0][:4])
    assert feats["layer1.0"].output is None and feats["layer1.0"].input is not None


def test_stop_after_last_skips_rest_of_forward(resnet, images):
    teacher, student = resnet
    plan = make_slice_plan(student, "block").select(["layer1.0", "layer2.0"])
    ran = []
    handle = teacher.layer3.register_forward_pre_hook(lambda *_: ran.append("layer3"))
    try:
        full = FeatureCapture(teacher, plan)(images[0][:4])
        assert ran == ["layer3"]
        ran.clear()
        early = FeatureCapture(teacher, plan, stop_after_last=True)(images[0][:4])
        assert ran == []  # nothing after layer2.0 ran
    finally:
        handle.remove()
    for name in plan.names():
        assert torch.equal(full[name].output, early[name].output)
    assert no_hooks(teacher)


def test_hooks_removed_after_exception_and_close(resnet):
    teacher, student = resnet
    plan = make_slice_plan(student, "layer")
    capture = FeatureCapture(teacher, plan)
    with pytest.raises(RuntimeError):
        capture(torch.randn(2, 3, 16, 16))  # wrong channel count: the forward raises
    assert no_hooks(teacher)
    with FeatureCapture(teacher, plan) as cap:
        cap(torch.randn(2, 1, 16, 16))
    assert no_hooks(teacher)
    with pytest.raises(RuntimeError, match="closed"):
        cap(torch.randn(2, 1, 16, 16))


def test_group_must_be_sequential(resnet, images):
    teacher, student = resnet
    ok = make_slice_plan(student, "group:2")
    FeatureCapture(teacher, ok)(images[0][:2])  # layer1.0 -> layer2.0 across layerX: fine
    bad = make_slice_plan(student, [["layer1.0.conv1", "layer1.0.conv2"]])
    with pytest.raises(SlicePlanError, match=r"not sequential.*layer1.0.conv1.*layer1.0.conv2"):
        FeatureCapture(teacher, bad)(images[0][:2])
    assert no_hooks(teacher)


def test_chain_check_follows_the_data_across_slices(resnet, images):
    teacher, _ = resnet
    x = images[0][:2]
    blocks = paths_plan("layer1.0", "layer2.0", "layer3.0")
    FeatureCapture(teacher, blocks, chain=True)(x)  # consecutive residual blocks: a chain
    gap = paths_plan("conv1", "layer1.0")  # bn1, relu and maxpool run in between
    with pytest.raises(SlicePlanError, match=r"not a chain.*'conv1'.*'layer1.0'"):
        FeatureCapture(teacher, gap, chain=True)(x)
    FeatureCapture(teacher, gap)(x)  # independent slices need no chain
    assert no_hooks(teacher)


def test_stop_before_the_last_slice_when_its_output_is_not_needed(resnet, images):
    teacher, _ = resnet
    x = images[0][:2]
    plan = paths_plan("layer1.0", "layer2.0")
    full = FeatureCapture(teacher, plan)(x)
    calls = []  # finished forwards of the last slice (a post hook: it ran to the end)
    handle = teacher.get_submodule("layer2.0").register_forward_hook(lambda *_: calls.append(1))
    try:
        inputs_only = FeatureCapture(teacher, plan, capture_outputs=False, stop_after_last=True)
        got = inputs_only(x)
        assert not calls  # the last slice never ran: its input was all that was needed
        # The chain check needs layer1.0's output, so the forward still stops at layer2.0.
        FeatureCapture(
            teacher,
            plan,
            capture_inputs=False,
            capture_outputs=False,
            stop_after_last=True,
            chain=True,
        )(x)
        assert not calls
        FeatureCapture(teacher, plan, stop_after_last=True)(x)
        assert len(calls) == 1  # outputs wanted: the last slice runs, then the forward stops
    finally:
        handle.remove()
    for name in plan.names():
        assert torch.equal(got[name].input, full[name].input)
        assert got[name].output is None


def test_inplace_modification_is_detected():
    model = nn.Sequential(nn.Conv2d(2, 4, 3), nn.ReLU(inplace=True), nn.Conv2d(4, 4, 1))
    student, _ = tensorize(model, {"rules": [{"pattern": "0", "ranks": [2, 2]}]})
    plan = make_slice_plan(student, "layer")
    with pytest.raises(RuntimeError, match="modified in place"):
        FeatureCapture(model, plan)(torch.randn(1, 2, 6, 6))


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_decoder_replay_with_captured_kwargs(kind):
    teacher, student = tiny_lm(kind)
    ids = torch.randint(0, 50, (2, 10))
    mask = torch.ones_like(ids)
    mask[0, :3] = 0  # left padding: the replay must get the same attention mask
    inputs = {"input_ids": ids, "attention_mask": mask}
    calls, handle = count_forwards(teacher)
    plan = make_slice_plan(student, "decoder")
    mlp_plan = make_slice_plan(student, "block")
    group_plan = make_slice_plan(student, "group:2")
    try:
        feats = FeatureCapture(teacher, plan)(inputs)
        mlp = FeatureCapture(teacher, mlp_plan, stop_after_last=True)(inputs)
        group = FeatureCapture(teacher, group_plan)(inputs)
    finally:
        handle.remove()
    assert len(calls) == 3
    with torch.no_grad():
        for s in plan:
            f = feats[s.name]
            assert "attention_mask" in f.kwargs
            assert all(not hasattr(v, "get_seq_length") for v in f.kwargs.values())  # no cache
            assert torch.allclose(s.forward(teacher, f.input, **f.kwargs), f.output, atol=1e-6)
            # Without the extra inputs the replay differs or fails (Llama needs the rotary
            # position embeddings), so the kwargs are really needed.
            try:
                bare = s.forward(teacher, f.input)
            except TypeError:
                bare = None
            assert bare is None or not torch.allclose(bare, f.output, atol=1e-4)
        for s in mlp_plan:
            assert mlp[s.name].kwargs == {}
            assert torch.equal(s.forward(teacher, mlp[s.name].input), mlp[s.name].output)
        g = group[group_plan[0].name]
        out = group_plan[0].forward(teacher, g.input, **g.kwargs)
        assert torch.allclose(out, g.output, atol=1e-6)
        assert torch.equal(g.output, feats[plan.names()[-1]].output)
    assert no_hooks(teacher)


def test_transformer_decoder_cache_refused(tmp_path):
    teacher, student = tiny_lm("gpt2")
    batches = [{"input_ids": torch.randint(0, 50, (2, 8))}]
    with pytest.raises(FeatureCacheError, match=r"needs extra inputs.*online mode"):
        write_feature_cache(
            tmp_path / "c", teacher, make_slice_plan(student, "decoder"), batches,
            dataset_identity=IDENTITY, progress=False,
        )  # fmt: skip
    assert not (tmp_path / "c").exists()
    # Transformer MLPs need nothing besides their input: cacheable (labels absent).
    manifest = write_feature_cache(
        tmp_path / "m", teacher, make_slice_plan(student, "block"), batches,
        dataset_identity=IDENTITY, progress=False, dtype="float32",
    )  # fmt: skip
    ds = open_feature_cache(tmp_path / "m")
    assert manifest.labels is None and len(ds) == 2
    feats, label = ds[1]
    assert label is None and feats["transformer.h.0.mlp"][0].shape == (8, 32)


# ----------------------------------------------------------------------- fingerprint
def test_teacher_fingerprint(resnet):
    teacher, _ = resnet
    fp = teacher_fingerprint(teacher)
    clone = small_resnet(width=8)
    clone.load_state_dict(teacher.state_dict())
    assert teacher_fingerprint(clone) == fp and len(fp) == 64
    with torch.no_grad():
        clone.layer3[0].conv1.weight[0, 0, 0, 0] += 1e-3
    assert teacher_fingerprint(clone) != fp
    assert teacher_fingerprint(clone.to(torch.bfloat16)) != fp  # dtype is part of it


# ----------------------------------------------------------------------- disk cache
def write(tmp, teacher, plan, images, **kw):
    kw.setdefault("dataset_identity", IDENTITY)
    kw.setdefault("progress", False)
    kw.setdefault("shard_size", 12)
    return write_feature_cache(tmp, teacher, plan, loader(images), **kw)


def test_cache_roundtrip_float32(resnet, images, tmp_path):
    teacher, student = resnet
    plan = make_slice_plan(student, "block")
    d = tmp_path / "cache"
    manifest = write(d, teacher, plan, images, dtype="float32")
    assert (d / MANIFEST_FILE).is_file()
    assert not list(tmp_path.glob("cache.partial-*"))  # temp dir renamed away
    assert manifest.num_samples == 40
    assert [s.num_samples for s in manifest.shards] == [12, 12, 12, 4]  # batches of 16 re-cut
    assert manifest.shards[0].file == "shard_00000.safetensors"
    assert manifest.teacher_fingerprint == teacher_fingerprint(teacher)
    assert manifest.plan == plan.to_dict() and manifest.dtype == "float32"
    assert manifest.features["layer2.0"] == {"input_shape": [8, 16, 16], "output_shape": [16, 8, 8]}
    raw = json.loads((d / MANIFEST_FILE).read_text())
    assert FeatureCacheManifest.from_dict(raw).hash() == manifest.hash()
    assert {"created", "tnexp_version", "format_version"} <= set(raw)

    ds = open_feature_cache(
        d,
        teacher_fingerprint=teacher_fingerprint(teacher),
        dataset_identity=dict(IDENTITY),
        plan=plan,
        dtype="float32",
        verify_checksums=True,
    )
    assert len(ds) == 40
    expected = FeatureCapture(teacher, plan)(images[0])
    for i in (0, 11, 12, 39):
        feats, label = ds[i]
        assert label == images[1][i]
        for name in plan.names():
            assert torch.equal(feats[name][0], expected[name].input[i])
            assert torch.equal(feats[name][1], expected[name].output[i])
    # Features are the teacher's eval-mode ones and the teacher's mode is restored.
    assert not teacher.training


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_cache_half_precision(resnet, images, tmp_path, dtype):
    teacher, student = resnet
    plan = make_slice_plan(student, "group:2")
    write(tmp_path / "c", teacher, plan, images, dtype=dtype)
    ds = open_feature_cache(tmp_path / "c", dtype=dtype)
    expected = FeatureCapture(teacher, plan)(images[0])
    feats, labels = collate_features([ds[i] for i in range(40)])
    assert torch.equal(labels, images[1])
    for name in plan.names():
        inp, out = feats[name]
        assert inp.dtype == ds.dtype == getattr(torch, dtype)
        tol = 1e-2 if dtype == "float16" else 4e-2
        assert torch.allclose(inp.float(), expected[name].input, rtol=tol, atol=tol)
        assert torch.allclose(out.float(), expected[name].output, rtol=tol, atol=tol)


def test_second_write_reuses(resnet, images, tmp_path):
    teacher, student = resnet
    plan = make_slice_plan(student, "block")
    first = write(tmp_path / "c", teacher, plan, images)
    calls, handle = count_forwards(teacher)
    try:
        again = write(tmp_path / "c", teacher, plan, images)
        # A sub-plan is served by the same cache too.
        write(tmp_path / "c", teacher, plan.select([0]), images)
    finally:
        handle.remove()
    assert calls == [] and again.hash() == first.hash()

    other = dict(IDENTITY, seed=1)
    with pytest.raises(FeatureCacheError, match=r"dataset identity mismatch.*overwrite=True"):
        write(tmp_path / "c", teacher, plan, images, dataset_identity=other)
    replaced = write(tmp_path / "c", teacher, plan, images, dataset_identity=other, overwrite=True)
    assert replaced.dataset_identity == other
    assert open_feature_cache(tmp_path / "c", dataset_identity=other).manifest == replaced
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c"]  # no partial / stale dirs


def test_non_cache_directory_is_not_clobbered(resnet, images, tmp_path):
    teacher, student = resnet
    d = tmp_path / "c"
    d.mkdir()
    (d / "notes.txt").write_text("mine")
    with pytest.raises(FeatureCacheError, match="not empty and holds no feature cache"):
        write(d, teacher, make_slice_plan(student, "block"), images)
    assert (d / "notes.txt").read_text() == "mine"


@pytest.fixture()
def cache(resnet, images, tmp_path):
    teacher, student = resnet
    plan = make_slice_plan(student, "block")
    d = tmp_path / "cache"
    write(d, teacher, plan, images)
    return d, teacher, plan


def test_refuses_stale_teacher(cache):
    d, teacher, _ = cache
    changed = small_resnet(width=8)
    changed.load_state_dict(teacher.state_dict())
    with torch.no_grad():
        changed.fc.bias[0] += 1.0
    with pytest.raises(FeatureCacheError, match=r"stale feature cache.*another teacher"):
        open_feature_cache(d, teacher_fingerprint=teacher_fingerprint(changed))
    open_feature_cache(d, teacher_fingerprint=teacher_fingerprint(teacher))


def test_refuses_other_dataset_dtype_plan(cache, resnet):
    d, _, _ = cache
    with pytest.raises(FeatureCacheError, match=r"dataset identity mismatch.*seed: cached 0 vs"):
        open_feature_cache(d, dataset_identity=dict(IDENTITY, seed=3))
    with pytest.raises(FeatureCacheError, match="stores float16, float32 was requested"):
        open_feature_cache(d, dtype="float32")
    layer_plan = make_slice_plan(resnet[1], "layer")
    with pytest.raises(FeatureCacheError, match=r"slice-plan mismatch.*layer1.0.conv1.*not in"):
        open_feature_cache(d, plan=layer_plan)
    moved = make_slice_plan(resnet[1], [["layer1.0", "layer2.0"]])
    with pytest.raises(FeatureCacheError, match="slice-plan mismatch"):
        open_feature_cache(d, plan=moved)


def test_per_slice_subset_read(cache):
    d, _, plan = cache
    ds = open_feature_cache(d, plan=plan.select(["layer3.0"]))
    assert ds.slice_names == ["layer3.0"]
    feats, _ = ds[5]
    assert list(feats) == ["layer3.0"]
    # Only this slice's tensors were read from the shard.
    assert set(ds._cache[0]) == {"layer3.0/input", "layer3.0/output", "labels"}
    full = open_feature_cache(d)
    assert torch.equal(full[5][0]["layer3.0"][1], feats["layer3.0"][1])
    with pytest.raises(FeatureCacheError, match="not in the feature cache"):
        open_feature_cache(d, slices=["layer9.0"])


def test_interrupted_capture_leaves_no_manifest(resnet, images, tmp_path):
    teacher, student = resnet
    d = tmp_path / "cache"
    with pytest.raises(RuntimeError, match="simulated crash"):
        write_feature_cache(
            d, teacher, make_slice_plan(student, "block"), loader(images, 8, fail_after=3),
            dataset_identity=IDENTITY, progress=False, shard_size=8,
        )  # fmt: skip
    assert not (d / MANIFEST_FILE).exists()
    with pytest.raises(FeatureCacheError, match="incomplete capture"):
        open_feature_cache(d)
    # A killed process leaves its temp dir behind: the error points at it.
    (tmp_path / f"cache.partial-{os.getpid()}-dead").mkdir()
    with pytest.raises(FeatureCacheError, match=r"cache\.partial-"):
        open_feature_cache(d)


def test_refuses_truncated_and_deleted_shards(cache):
    d, _, _ = cache
    shard = d / "shard_00001.safetensors"
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])
    with pytest.raises(FeatureCacheError, match=r"shard_00001\.safetensors has \d+ bytes.*trunc"):
        open_feature_cache(d)
    shard.unlink()
    with pytest.raises(FeatureCacheError, match=r"shard_00001\.safetensors is missing"):
        open_feature_cache(d)


def test_corrupt_shard_checksum_and_load_errors(cache):
    d, _, _ = cache
    shard = d / "shard_00000.safetensors"
    data = bytearray(shard.read_bytes())
    data[-5] ^= 0xFF  # same size, different content
    shard.write_bytes(bytes(data))
    open_feature_cache(d)  # sizes match: only the checksum can tell
    with pytest.raises(FeatureCacheError, match=r"shard_00000\.safetensors fails its sha256"):
        open_feature_cache(d, verify_checksums=True)
    # A shard that breaks after opening fails on load, naming the file.
    ds = open_feature_cache(d)
    (d / "shard_00002.safetensors").write_bytes(b"\x00" * 16)
    with pytest.raises(FeatureCacheError, match=r"cannot load .*shard_00002\.safetensors"):
        ds[30]


def test_corrupt_or_foreign_manifest(cache):
    d, _, _ = cache
    path = d / MANIFEST_FILE
    good = json.loads(path.read_text())
    path.write_text(json.dumps(dict(good, format_version=99)))
    with pytest.raises(FeatureCacheError, match="format version 99"):
        open_feature_cache(d)
    path.write_text(path.read_text()[:50])
    with pytest.raises(FeatureCacheError, match="unreadable or corrupt"):
        open_feature_cache(d)


def test_sampler_and_dataloader(cache):
    d, _, _ = cache
    ds = open_feature_cache(d)
    sampler = ShardGroupedSampler(ds, shuffle=True, seed=0)
    epochs = [list(sampler) for _ in range(2)]
    for order in epochs:
        assert sorted(order) == list(range(40))  # every index exactly once
        shards = [next(k for k, (a, b) in enumerate(ds.shard_ranges) if a <= i < b) for i in order]
        runs = [s for k, s in enumerate(shards) if k == 0 or s != shards[k - 1]]
        assert len(runs) == len(ds.shard_ranges)  # each shard read in one contiguous run
    assert epochs[0] != epochs[1]  # a new order each epoch
    sampler.set_epoch(0)
    assert list(sampler) == epochs[0]
    assert list(ShardGroupedSampler(ds, shuffle=False)) == list(range(40))

    dl = DataLoader(ds, batch_size=8, sampler=sampler, collate_fn=FeatureCacheDataset.collate)
    feats, labels = next(iter(dl))
    assert labels.shape == (8,)
    assert feats["layer1.0"][0].shape == (8, 8, 16, 16)
    assert feats["layer4.0"][1].shape == (8, 64, 2, 2)


def test_batched_read_equals_per_sample_collate(resnet, images, tmp_path):
    """``__getitems__`` (what a DataLoader fetches: one gather per tensor and shard) gives
    exactly the batch that stacking the per-sample items gives, across shard boundaries and
    for a shard that recurs after another one (restored batch order)."""
    teacher, student = resnet
    plan = make_slice_plan(student, "block")
    write(tmp_path / "c", teacher, plan, images, dtype="float16")  # shards of 12 samples
    ds = open_feature_cache(tmp_path / "c", dtype="float16")
    for indices in ([3, 0, 7], [10, 11, 12, 13, 30], [25, 2, 26, -1, 14, 3]):
        batched = collate_features(ds.__getitems__(indices))
        expected = collate_features([ds[i] for i in indices])
        assert type(batched) is tuple and torch.equal(batched[1], expected[1])
        assert list(batched[0]) == list(expected[0]) == plan.names()
        for name in plan.names():
            for got, want in zip(batched[0][name], expected[0][name]):
                assert got.dtype == want.dtype and torch.equal(got, want)
    with pytest.raises(IndexError, match="out of range"):
        ds.__getitems__([0, len(ds)])
    # A DataLoader uses the batched read (collate_features passes the batch through).
    dl = DataLoader(ds, batch_size=8, sampler=ShardGroupedSampler(ds), collate_fn=ds.collate)
    seen = torch.cat([labels for _, labels in dl])
    assert sorted(seen.tolist()) == sorted(images[1].tolist())
