"""CIFAR ResNets: shapes, torchvision-compatible module names, stem geometry, registry."""

from __future__ import annotations

import fnmatch

import pytest
import torch
import torch.nn as nn
import torchvision

from tnexp.models import (
    MODEL_REGISTRY,
    CifarResNet,
    build_model,
    cifar_resnet18,
    cifar_resnet34,
    small_resnet,
)


def _convs(model: nn.Module, kernel: int) -> list[str]:
    return [
        n
        for n, m in model.named_modules()
        if isinstance(m, nn.Conv2d) and m.kernel_size == (kernel, kernel)
    ]


@pytest.mark.parametrize("in_channels", [1, 3])
@pytest.mark.parametrize("factory", [cifar_resnet18, cifar_resnet34])
def test_cifar_resnet_output_shape(factory, in_channels):
    model = factory(num_classes=7, in_channels=in_channels).eval()
    with torch.no_grad():
        out = model(torch.randn(2, in_channels, 32, 32))
    assert out.shape == (2, 7)
    assert model.conv1.in_channels == in_channels


@pytest.mark.parametrize("in_channels", [1, 3])
@pytest.mark.parametrize("size", [8, 16])
def test_small_resnet_output_shape(in_channels, size):
    model = small_resnet(num_classes=10, in_channels=in_channels)
    out = model(torch.randn(4, in_channels, size, size))
    assert out.shape == (4, 10)
    out.sum().backward()  # trainable end to end
    assert model.conv1.weight.grad is not None


def test_is_torchvision_resnet_with_cifar_stem():
    model = cifar_resnet18()
    assert isinstance(model, torchvision.models.resnet.ResNet)
    assert isinstance(model.maxpool, nn.Identity)
    assert model.conv1.kernel_size == (3, 3)
    assert model.conv1.stride == (1, 1)
    assert model.conv1.padding == (1, 1)
    assert isinstance(model.layer1[0], torchvision.models.resnet.BasicBlock)


@pytest.mark.parametrize(
    ("ours", "theirs"),
    [(cifar_resnet18, torchvision.models.resnet18), (cifar_resnet34, torchvision.models.resnet34)],
)
def test_state_dict_matches_torchvision(ours, theirs):
    a = ours(num_classes=10).state_dict()
    b = theirs(weights=None).state_dict()
    assert list(a) == list(b)
    for key in a:
        if key.startswith(("conv1.", "fc.")):
            continue  # CIFAR stem (3x3) and 10-way classifier differ by design
        assert a[key].shape == b[key].shape, key


def test_small_resnet_module_names_match_torchvision():
    small = small_resnet(width=16, blocks=(1, 1, 1, 1))
    names = dict(small.named_modules())
    for name in [
        "conv1", "bn1", "maxpool", "layer1.0.conv1", "layer1.0.bn2",
        "layer2.0.downsample.0", "layer4.0.conv2", "avgpool", "fc",
    ]:  # fmt: skip
        assert name in names, name
    assert isinstance(names["maxpool"], nn.Identity)
    # The same pattern selects the block convs of every model.
    for model, n_blocks in [(small, 4), (cifar_resnet18(), 8), (cifar_resnet34(), 16)]:
        hits = [n for n, _ in model.named_modules() if fnmatch.fnmatchcase(n, "layer*.*.conv*")]
        assert len(hits) == 2 * n_blocks
    # Narrow widths: 16, 32, 64, 128.
    assert small.layer1[0].conv1.out_channels == 16
    assert small.layer4[0].conv2.out_channels == 128
    assert small.fc.in_features == 128
    assert sum(p.numel() for p in small.parameters()) < 400_000


def test_small_resnet_blocks_per_stage():
    model = small_resnet(blocks=(2, 1, 3, 1), width=8)
    assert [len(getattr(model, f"layer{i}")) for i in range(1, 5)] == [2, 1, 3, 1]
    assert model.layer1[0].downsample is None  # width unchanged, stride 1
    assert model.layer2[0].downsample is not None


def test_resnet34_conv_counts():
    model = cifar_resnet34()
    # stem + 2 convs in each of 3+4+6+3 = 16 blocks
    assert len(_convs(model, 3)) == 1 + 32
    # 1x1 downsample shortcuts at the start of layer2, layer3, layer4
    assert _convs(model, 1) == [f"layer{i}.0.downsample.0" for i in (2, 3, 4)]
    assert sum(isinstance(m, nn.Conv2d) for m in model.modules()) == 36


def test_stride_one_stem_keeps_resolution_until_layer2():
    model = cifar_resnet18().eval()
    shapes: dict[str, tuple[int, ...]] = {}
    for name in ("conv1", "layer1", "layer2", "layer3", "layer4"):
        module = model.get_submodule(name)
        module.register_forward_hook(
            lambda _m, _i, out, name=name: shapes.__setitem__(name, tuple(out.shape))
        )
    with torch.no_grad():
        model(torch.randn(1, 3, 32, 32))
    assert shapes["conv1"] == (1, 64, 32, 32)
    assert shapes["layer1"] == (1, 64, 32, 32)
    assert shapes["layer2"] == (1, 128, 16, 16)
    assert shapes["layer3"] == (1, 256, 8, 8)
    assert shapes["layer4"] == (1, 512, 4, 4)


def test_relus_are_not_inplace():
    # In-place ReLU would overwrite activations captured by forward hooks.
    model = small_resnet()
    relus = [m for m in model.modules() if isinstance(m, nn.ReLU)]
    assert relus and not any(m.inplace for m in relus)
    captured = {}
    model.layer1[0].bn1.register_forward_hook(lambda _m, _i, out: captured.setdefault("bn", out))
    model(torch.randn(2, 1, 8, 8))
    assert (captured["bn"] < 0).any()  # would be clamped to >= 0 by an in-place ReLU


def test_build_model_registry():
    assert set(MODEL_REGISTRY) == {"cifar_resnet18", "cifar_resnet34", "small_resnet"}
    model = build_model("small_resnet", num_classes=5, in_channels=3, width=8)
    assert isinstance(model, CifarResNet)
    assert model.fc.out_features == 5
    assert model.conv1.in_channels == 3
    assert model.conv1.out_channels == 8
    with pytest.raises(ValueError, match="known models: cifar_resnet18, cifar_resnet34"):
        build_model("resnet9000")


def test_invalid_arguments():
    with pytest.raises(ValueError, match="4 entries"):
        small_resnet(blocks=(1, 1, 1))
    with pytest.raises(ValueError, match="width"):
        small_resnet(width=0)
