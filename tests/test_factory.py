import json

import pytest
import torch
import torchvision
from tiny_lm import small_gpt2, small_llama
from torch import nn

from tnexp.factory import (
    TensorizeSpec,
    count_parameters,
    load_tensorized,
    merge_for_inference,
    save_tensorized,
    set_contraction,
    set_tucker_order,
    tensorize,
    tensorized_modules,
)
from tnexp.models import small_resnet
from tnexp.tn import MPOLinear, TensorizationError, TuckerConv2d

RESNET_SPEC = {"rules": [{"pattern": "layer*.*.conv*", "cr": 0.5}], "exclude": ["layer1.0.conv1"]}


def test_resnet34_tucker_report_counts():
    teacher = torchvision.models.resnet34(num_classes=10)
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    student, report = tensorize(teacher, RESNET_SPEC)
    # 32 block convs, one excluded; downsample convs do not match the pattern.
    assert len(report.layers) == 31
    assert set(tensorized_modules(student)) == {layer.name for layer in report.layers}
    assert all(
        isinstance(student.get_submodule(n), TuckerConv2d) for n in tensorized_modules(student)
    )
    assert isinstance(student.get_submodule("layer1.0.conv1"), nn.Conv2d)
    # Report totals are the real parameter counts of both models.
    assert report.model_params_before == count_parameters(teacher)
    assert report.model_params_after == count_parameters(student)
    delta = report.tensorized_params_before - report.tensorized_params_after
    assert report.model_params_before - report.model_params_after == delta
    for layer in report.layers:
        assert abs(layer.cr - 0.5) < 0.02
        module = student.get_submodule(layer.name)
        assert layer.params_after == sum(p.numel() for p in module.parameters())
    # The teacher is untouched.
    for k, v in teacher.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert not tensorized_modules(teacher)
    out = student(torch.randn(2, 3, 32, 32))
    assert out.shape == (2, 10) and torch.isfinite(out).all()
    data = json.loads(report.to_json())
    assert data["totals"]["num_layers"] == 31
    assert "layer4.2.conv2" in str(report)


def test_resnet18_full_rank_reproduces_outputs():
    teacher = torchvision.models.resnet18(num_classes=10).double().eval()
    convs = [n for n, m in teacher.named_modules() if isinstance(m, nn.Conv2d)]
    rules = [
        {
            "pattern": n,
            "ranks": [teacher.get_submodule(n).out_channels, teacher.get_submodule(n).in_channels],
        }
        for n in convs
    ]
    student, _ = tensorize(teacher, {"rules": rules})
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    torch.testing.assert_close(student(x), teacher(x), atol=1e-8, rtol=1e-8)


def test_gpt2_conv1d_mlp():
    teacher = small_gpt2(n_embd=48, vocab_size=101)
    spec = {
        "rules": [
            {"pattern": "transformer.h.*.mlp.c_fc", "cr": 0.5},
            {"pattern": "transformer.h.*.mlp.c_proj", "cr": 0.5},
        ]
    }
    student, report = tensorize(teacher, spec)
    assert [layer.name for layer in report.layers] == [
        "transformer.h.0.mlp.c_fc",
        "transformer.h.0.mlp.c_proj",
        "transformer.h.1.mlp.c_fc",
        "transformer.h.1.mlp.c_proj",
    ]
    assert report.layers[0].module_type == "Conv1D"
    assert report.layers[0].in_factors == [6, 8] and report.layers[0].out_factors == [12, 16]
    ids = torch.randint(0, 101, (2, 10))
    logits = student(ids).logits
    assert logits.shape == (2, 10, 101) and torch.isfinite(logits).all()
    # Tied embeddings stay tied and are counted once.
    assert student.lm_head.weight is student.transformer.wte.weight
    assert report.model_params_before == count_parameters(teacher)


def test_llama_mlp_and_overall_cr():
    teacher = small_llama(48, 128, 101)
    spec = {"rules": [{"pattern": "model.layers.*.mlp.*_proj"}], "overall_cr": 0.3}
    student, report = tensorize(teacher, spec)
    assert len(report.layers) == 6
    assert {layer.name.rsplit(".", 1)[1] for layer in report.layers} == {
        "gate_proj",
        "up_proj",
        "down_proj",
    }
    assert report.per_layer_cr is not None and report.per_layer_cr > 0.3
    # One bond step on the largest layer moves the whole-model CR by at most this much.
    step = max(sum(f) for layer in report.layers for f in [layer.in_factors])
    assert abs(report.model_cr - 0.3) < 0.01 + step * 20 / report.model_params_before
    logits = student(torch.randint(0, 101, (1, 8))).logits
    assert torch.isfinite(logits).all()


def test_overall_cr_unreachable():
    teacher = small_gpt2(n_embd=48, vocab_size=101)
    spec = {"rules": [{"pattern": "transformer.h.0.mlp.c_fc"}], "overall_cr": 0.9}
    with pytest.raises(TensorizationError, match="out of reach"):
        tensorize(teacher, spec)


def test_save_load_round_trip(tmp_path):
    teacher = small_gpt2(n_embd=48, vocab_size=101)
    student, report = tensorize(
        teacher, {"rules": [{"pattern": "transformer.h.*.mlp.c_*", "cr": 0.4, "init": "svd"}]}
    )
    save_tensorized(student, report, tmp_path / "saved")
    from transformers import GPT2Config, GPT2LMHeadModel

    base = GPT2LMHeadModel(
        GPT2Config(n_embd=48, n_layer=2, n_head=4, n_positions=64, vocab_size=101)
    )
    loaded, loaded_report = load_tensorized(tmp_path / "saved", base=base)
    for (ka, va), (kb, vb) in zip(student.state_dict().items(), loaded.state_dict().items()):
        assert ka == kb and torch.equal(va, vb), ka
    ids = torch.randint(0, 101, (1, 7))
    assert torch.equal(student(ids).logits, loaded.eval()(ids).logits)
    assert loaded_report.to_dict() == report.to_dict()


def test_save_load_with_base_config(tmp_path):
    base_config = {"_target_": "tnexp.models.small_resnet", "num_classes": 4, "width": 8}
    teacher = small_resnet(num_classes=4, width=8)
    student, report = tensorize(teacher, {"rules": [{"pattern": "layer4.*.conv*", "cr": 0.7}]})
    save_tensorized(student, report, tmp_path, base_config=base_config)
    loaded, _ = load_tensorized(tmp_path)
    x = torch.randn(1, 1, 16, 16)
    torch.testing.assert_close(loaded.eval()(x), student.eval()(x))


def test_load_missing_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a saved tensorized model"):
        load_tensorized(tmp_path)


def test_load_into_wrong_architecture(tmp_path):
    student, report = tensorize(
        torchvision.models.resnet18(num_classes=4),
        {"rules": [{"pattern": "layer4.*.conv*", "cr": 0.7}]},
    )
    save_tensorized(student, report, tmp_path)
    with pytest.raises(TensorizationError, match="do not fit"):
        load_tensorized(tmp_path, base=torchvision.models.resnet18(num_classes=7))


def test_contraction_override_and_merge():
    teacher = small_gpt2(n_embd=48, vocab_size=101)
    student, _ = tensorize(
        teacher,
        {
            "rules": [{"pattern": "transformer.h.*.mlp.c_*", "cr": 0.5}],
            "contraction": "left_to_right",
        },
    )
    ids = torch.randint(0, 101, (1, 5))
    with torch.no_grad():
        ref = student(ids).logits
    assert {m.last_order for m in student.modules() if isinstance(m, MPOLinear)} == {
        "left_to_right"
    }
    set_contraction(student, "dense")
    merge_for_inference(student)
    with torch.no_grad():
        torch.testing.assert_close(student(ids).logits, ref, atol=1e-5, rtol=1e-4)


def test_tucker_order_and_order_timing_from_the_spec():
    teacher = small_resnet(width=8, num_classes=10)
    spec = {**RESNET_SPEC, "tucker_order": "merged", "order_timing": "off"}
    student, _ = tensorize(teacher, spec)
    tuckers = [m for m in student.modules() if isinstance(m, TuckerConv2d)]
    assert tuckers and all(m.order == "merged" and not m.calibrate for m in tuckers)
    x = torch.randn(2, 1, 16, 16)
    with torch.no_grad():
        ref = student(x)
    assert {m.last_order for m in tuckers} == {"merged"}
    set_tucker_order(student, "factored")
    with torch.no_grad():
        torch.testing.assert_close(student(x), ref, atol=1e-5, rtol=1e-4)
    assert {m.last_order for m in tuckers} == {"factored"}
    with pytest.raises(TensorizationError, match="Tucker order"):
        set_tucker_order(student, "fused")
    gpt, _ = tensorize(
        small_gpt2(n_embd=48, vocab_size=101),
        {"rules": [{"pattern": "transformer.h.*.mlp.c_*", "cr": 0.5}], "order_timing": "all"},
    )
    assert all(m.calibrate for m in gpt.modules() if isinstance(m, MPOLinear))
    default, _ = tensorize(teacher, RESNET_SPEC)
    assert all(
        m.order == "auto" and not m.calibrate  # default order_timing "off": FLOPs choose
        for m in default.modules()
        if isinstance(m, TuckerConv2d)
    )
    for key, value in (("tucker_order", "fused"), ("order_timing", "always")):
        with pytest.raises(TensorizationError, match=key):
            tensorize(teacher, {**RESNET_SPEC, key: value})


@pytest.mark.parametrize(
    "spec, message",
    [
        ({"rules": [{"pattern": "layer9.*.conv*", "cr": 0.5}]}, "matches no tensorizable module"),
        ({"rules": [{"pattern": "layer1.0.conv3", "cr": 0.5}]}, "layer1.0.conv1"),
        ({"rules": [{"pattern": "layer*.*.conv*", "cr": 1.2}]}, "strictly between 0 and 1"),
        ({"rules": [{"pattern": "layer*.*.conv*", "cr": 0.0}]}, "strictly between 0 and 1"),
        ({"rules": [{"pattern": "layer1.0.conv1", "ranks": [65, 8]}]}, "r_out <= 64"),
        ({"rules": [{"pattern": "layer1.0.conv1", "cr": 0.9999}]}, "rank below 1"),
        ({"rules": [{"pattern": "fc", "method": "tucker", "cr": 0.5}]}, "asks for tucker"),
        ({"rules": [{"pattern": "fc", "cr": 0.5, "in_factors": [7, 73]}]}, "multiply to 511"),
        ({"rules": [{"pattern": "layer*.*.conv*"}]}, "neither cr"),
        ({"rules": [{"pattern": "layer*.**", "cr": 0.5}], "exclude": ["nope"]}, "exclusion 'nope'"),
        ({"rules": [{"pattern": "layer*.**", "cr": 0.5}], "colour": 1}, "unknown tensorization"),
        ({"rules": [{"pattern": "layer*.**", "cr": 0.5}], "overall_cr": 0.3}, "remove cr"),
        ({"rules": [{"pattern": "layer*.**", "cr": 0.5}], "contraction": "fast"}, "contraction"),
    ],
)
def test_bad_specs(spec, message):
    with pytest.raises(TensorizationError, match=message):
        tensorize(torchvision.models.resnet18(num_classes=10), spec)


def test_unsupported_layer_type():
    model = nn.Sequential(nn.Embedding(10, 4), nn.Linear(4, 4))
    with pytest.raises(TensorizationError, match="matches no tensorizable module"):
        tensorize(model, {"rules": [{"pattern": "0", "cr": 0.5}]})


def test_spec_from_hydra_config():
    from omegaconf import OmegaConf

    cfg = OmegaConf.create(
        {
            "rules": [{"pattern": "layer*.*.conv*", "cr": 0.7, "init": "random"}],
            "exclude": ["layer1.0.conv1"],
        }
    )
    spec = TensorizeSpec.from_config(cfg)
    assert spec.rules[0].cr == 0.7 and spec.rules[0].init == "random"
    assert TensorizeSpec.from_config(spec.to_dict()) == spec


@pytest.mark.parametrize("cr", [0.5, 0.8])
def test_hooi_init_error_is_at_most_hosvd(cr):
    torch.manual_seed(0)
    conv = nn.Conv2d(24, 32, 3)
    with torch.no_grad():  # a kernel with a decaying channel spectrum, like trained ones
        conv.weight.mul_(torch.linspace(1.0, 0.05, 32).view(-1, 1, 1, 1))
    model = nn.Sequential(conv)
    errors = {}
    for init in ("svd", "hooi"):
        _, report = tensorize(model, {"rules": [{"pattern": "0", "cr": cr, "init": init}]})
        errors[init] = report.layers[0].weight_error
        assert report.layers[0].init == init
    assert errors["hooi"] <= errors["svd"] + 1e-9
    assert errors["hooi"] < errors["svd"]  # it does refine, not only copy


def test_hooi_on_a_linear_layer_says_what_to_use():
    with pytest.raises(TensorizationError, match=r"init 'hooi'.*Use init: svd"):
        tensorize(
            nn.Sequential(nn.Linear(16, 16)),
            {"rules": [{"pattern": "0", "cr": 0.5, "init": "hooi"}]},
        )
