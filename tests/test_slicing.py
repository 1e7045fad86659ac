import json

import pytest
import torch
from tiny_lm import small_gpt2, small_llama

from tnexp.factory import tensorize
from tnexp.models.resnet import small_resnet
from tnexp.slicing import Slice, SlicePlan, SlicePlanError, make_slice_plan
from tnexp.tn import MPOLinear, TuckerConv2d

RESNET_SPEC = {"rules": [{"pattern": "layer*.*.conv*", "cr": 0.5}]}


@pytest.fixture(scope="module")
def resnet_student():
    torch.manual_seed(0)
    student, _ = tensorize(small_resnet(width=8).eval(), RESNET_SPEC)
    return student


@pytest.fixture(scope="module")
def deep_resnet_student():
    torch.manual_seed(0)
    teacher = small_resnet(width=8, blocks=(2, 1, 1, 1)).eval()
    student, _ = tensorize(teacher, RESNET_SPEC)
    return student


@pytest.fixture(scope="module")
def gpt2_student():
    torch.manual_seed(0)
    student, _ = tensorize(
        small_gpt2(), {"rules": [{"pattern": "transformer.h.*.mlp.c_*", "cr": 0.5}]}
    )
    return student


@pytest.fixture(scope="module")
def llama_student():
    torch.manual_seed(0)
    student, _ = tensorize(
        small_llama(), {"rules": [{"pattern": "model.layers.*.mlp.*_proj", "cr": 0.5}]}
    )
    return student


# ----------------------------------------------------------------------- granularities
def test_resnet_layer_block_group(deep_resnet_student):
    m = deep_resnet_student
    layer = make_slice_plan(m, "layer")
    assert layer.granularity == "layer"
    assert layer.names()[:3] == ["layer1.0.conv1", "layer1.0.conv2", "layer1.1.conv1"]
    assert len(layer) == 10
    assert all(s.paths == (s.name,) for s in layer)

    block = make_slice_plan(m, "block")
    assert block.names() == ["layer1.0", "layer1.1", "layer2.0", "layer3.0", "layer4.0"]

    g2 = make_slice_plan(m, "group:2")
    assert [s.paths for s in g2] == [
        ("layer1.0", "layer1.1"),
        ("layer2.0", "layer3.0"),  # groups cross layerX boundaries
        ("layer4.0",),  # the last group may be shorter
    ]
    assert g2.names()[0] == "layer1.0+layer1.1"
    assert make_slice_plan(m, "group:1").names() == block.names()


def test_transformer_granularities(gpt2_student, llama_student):
    g = gpt2_student
    assert make_slice_plan(g, "layer").names() == [
        "transformer.h.0.mlp.c_fc",
        "transformer.h.0.mlp.c_proj",
        "transformer.h.1.mlp.c_fc",
        "transformer.h.1.mlp.c_proj",
    ]
    assert make_slice_plan(g, "block").names() == ["transformer.h.0.mlp", "transformer.h.1.mlp"]
    assert make_slice_plan(g, "decoder").names() == ["transformer.h.0", "transformer.h.1"]
    assert [s.paths for s in make_slice_plan(g, "group:2")] == [
        ("transformer.h.0", "transformer.h.1")
    ]

    ll = llama_student
    assert make_slice_plan(ll, "block").names() == ["model.layers.0.mlp", "model.layers.1.mlp"]
    assert make_slice_plan(ll, "decoder").names() == ["model.layers.0", "model.layers.1"]
    assert len(make_slice_plan(ll, "layer")) == 6


def test_blocks_without_tensorized_layers_are_skipped():
    resnet, _ = tensorize(small_resnet(width=8), {"rules": [{"pattern": "layer2.**", "cr": 0.5}]})
    assert make_slice_plan(resnet, "block").names() == ["layer2.0"]
    assert make_slice_plan(resnet, "group:2").names() == ["layer1.0+layer2.0"]
    assert make_slice_plan(resnet, "group:3").names() == ["layer1.0+layer2.0+layer3.0"]

    spec = {"rules": [{"pattern": "transformer.h.1.mlp.c_fc", "cr": 0.5}]}
    gpt, _ = tensorize(small_gpt2(), spec)
    assert make_slice_plan(gpt, "decoder").names() == ["transformer.h.1"]
    assert make_slice_plan(gpt, "block").names() == ["transformer.h.1.mlp"]


def test_explicit_list(resnet_student):
    plan = make_slice_plan(resnet_student, ["layer1.0", ["layer2.0", "layer3.0"], "layer4.0.conv1"])
    assert plan.granularity == "explicit"
    assert plan.names() == ["layer1.0", "layer2.0+layer3.0", "layer4.0.conv1"]
    assert plan["layer2.0+layer3.0"].paths == ("layer2.0", "layer3.0")


# ----------------------------------------------------------------------- errors
def test_unknown_granularity_lists_valid(resnet_student):
    with pytest.raises(ValueError, match=r"unknown slice granularity 'blocks'.*'layer'.*group"):
        make_slice_plan(resnet_student, "blocks")
    with pytest.raises(ValueError, match="unknown slice granularity"):
        make_slice_plan(resnet_student, "group:x")
    with pytest.raises(ValueError, match="group size must be >= 1"):
        make_slice_plan(resnet_student, "group:0")


def test_decoder_on_cnn_and_untensorized_model(resnet_student):
    with pytest.raises(SlicePlanError, match="found no decoder layers"):
        make_slice_plan(resnet_student, "decoder")
    with pytest.raises(SlicePlanError, match=r"no tensorized layer.*tensorize"):
        make_slice_plan(small_resnet(width=8), "block")


def test_missing_path_suggests_close_names(resnet_student):
    with pytest.raises(SlicePlanError, match=r"no module at path 'layer1.0.conv3'.*layer1.0.conv1"):
        make_slice_plan(resnet_student, ["layer1.0.conv3"])


def test_overlap_errors(resnet_student):
    with pytest.raises(SlicePlanError, match=r"overlap: 'layer1\.0\.conv1' is inside 'layer1\.0'"):
        make_slice_plan(resnet_student, ["layer1.0", "layer1.0.conv1"])
    with pytest.raises(SlicePlanError, match=r"'layer2\.0' is listed twice"):
        make_slice_plan(resnet_student, ["layer2.0", ["layer3.0", "layer2.0"]])
    with pytest.raises(SlicePlanError, match="overlap"):
        make_slice_plan(resnet_student, [["layer1", "layer1.0"]])


def test_explicit_slice_without_tensorized_layer(resnet_student):
    with pytest.raises(SlicePlanError, match=r"'layer1\.0\.bn1' contains no tensorized layer"):
        make_slice_plan(resnet_student, ["layer1.0.conv1", "layer1.0.bn1"])


# ----------------------------------------------------------------------- plan API
def test_select_and_lookup(resnet_student):
    plan = make_slice_plan(resnet_student, "block")
    sub = plan.select(["layer3.0", 0])
    assert sub.names() == ["layer1.0", "layer3.0"]  # plan (forward) order kept
    assert plan.select(None).names() == plan.names()
    assert plan.select(-1).names() == ["layer4.0"]
    assert plan[1].name == "layer2.0" and plan["layer2.0"] is plan[1]
    with pytest.raises(SlicePlanError, match=r"out of range.*0\.\.3"):
        plan.select([7])
    with pytest.raises(SlicePlanError, match=r"no slice named 'layer3\.1'.*layer3\.0"):
        plan.select(["layer3.1"])
    with pytest.raises(SlicePlanError, match="no slice named"):
        plan["nope"]


def test_to_dict_roundtrip(gpt2_student):
    plan = make_slice_plan(gpt2_student, "group:2")
    data = json.loads(json.dumps(plan.to_dict()))
    again = SlicePlan.from_dict(data)
    assert again == plan
    assert again.granularity == "group:2"
    assert again.slices[0].paths == ("transformer.h.0", "transformer.h.1")
    with pytest.raises(SlicePlanError, match="appears twice"):
        SlicePlan([Slice("a", ("x",)), Slice("a", ("y",))])


def test_slice_parameters_and_forward(resnet_student):
    m = resnet_student
    plan = make_slice_plan(m, "group:2")
    s = plan[0]
    assert [type(mod).__name__ for mod in s.modules(m)] == ["BasicBlock", "BasicBlock"]
    params = s.parameters(m)
    expected = list(m.layer1.parameters()) + list(m.layer2.parameters())
    assert {id(p) for p in params} == {id(p) for p in expected}
    assert len(params) == len(expected)
    tens = s.tensorized_parameters(m)
    layers = s.tensorized_layers(m)
    assert set(layers) == {"layer1.0.conv1", "layer1.0.conv2", "layer2.0.conv1", "layer2.0.conv2"}
    assert all(isinstance(v, TuckerConv2d) for v in layers.values())
    assert {id(p) for p in tens} == {id(p) for v in layers.values() for p in v.parameters()}
    assert len(tens) < len(params)  # batch norms and downsample are not tensorized

    x = torch.randn(2, 8, 8, 8)
    m.eval()
    with torch.no_grad():
        assert torch.equal(s.forward(m, x), m.layer2(m.layer1(x)))


def test_transformer_layer_slice_params(gpt2_student):
    s = make_slice_plan(gpt2_student, "block")[0]
    layers = s.tensorized_layers(gpt2_student)
    assert set(layers) == {"transformer.h.0.mlp.c_fc", "transformer.h.0.mlp.c_proj"}
    assert all(isinstance(v, MPOLinear) for v in layers.values())
