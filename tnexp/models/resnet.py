"""CIFAR-style ResNets built on torchvision's ``ResNet`` / ``BasicBlock`` machinery.

The ImageNet stem of torchvision (7x7 stride-2 conv + max-pool) shrinks a 32x32 image to
8x8 before the first block, which wastes most of the network on CIFAR-sized inputs. The
CIFAR variant used by the paper keeps a 3x3 stride-1 stem and no max-pool.

Module names are kept identical to torchvision's (``conv1``, ``bn1``, ``layer1.0.conv1``,
``layer2.0.downsample.0``, ..., ``fc``) for every model here, including the narrow
``small_resnet``, so that module-path patterns such as ``layer*.*.conv*`` select the same
layers everywhere and torchvision state-dict keys line up.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch.nn as nn
from torchvision.models.resnet import BasicBlock, ResNet

__all__ = [
    "MODEL_REGISTRY",
    "CifarResNet",
    "build_model",
    "cifar_resnet18",
    "cifar_resnet34",
    "small_resnet",
]


class CifarResNet(ResNet):
    """torchvision ``ResNet`` of ``BasicBlock``s with a CIFAR stem and a width multiplier.

    Stage widths are ``(width, 2*width, 4*width, 8*width)``; ``width=64`` gives exactly the
    torchvision ResNet-18/34 layer shapes (except the stem and the classifier).

    ``forward`` and ``_make_layer`` are inherited from torchvision unchanged; only the
    constructor is rewritten, because torchvision hard-codes the widths 64..512 there.
    """

    def __init__(
        self,
        layers: Sequence[int],
        num_classes: int = 10,
        in_channels: int = 3,
        width: int = 64,
        zero_init_residual: bool = False,
    ) -> None:
        if len(layers) != 4:
            raise ValueError(f"layers must have 4 entries (one per stage), got {list(layers)}")
        if any(int(n) < 1 for n in layers):
            raise ValueError(f"every stage needs at least one block, got {list(layers)}")
        if width < 1:
            raise ValueError(f"width must be >= 1, got {width}")
        # Skip ResNet.__init__ on purpose: it would allocate the full 64..512-wide network
        # only for us to throw it away. We set exactly the attributes that torchvision's
        # `_make_layer` and `_forward_impl` read.
        nn.Module.__init__(self)
        self._norm_layer = nn.BatchNorm2d
        self.groups = 1
        self.base_width = 64  # BasicBlock only accepts base_width=64 (it is not a width knob)
        self.dilation = 1
        self.inplanes = width
        self.in_channels = in_channels
        self.num_classes = num_classes
        self.widths = (width, 2 * width, 4 * width, 8 * width)

        # CIFAR stem: 3x3, stride 1, no max-pool (Identity keeps the `maxpool` name).
        self.conv1 = nn.Conv2d(in_channels, width, kernel_size=3, stride=1, padding=1, bias=False)
        self.bn1 = self._norm_layer(width)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.Identity()
        self.layer1 = self._make_layer(BasicBlock, self.widths[0], int(layers[0]))
        self.layer2 = self._make_layer(BasicBlock, self.widths[1], int(layers[1]), stride=2)
        self.layer3 = self._make_layer(BasicBlock, self.widths[2], int(layers[2]), stride=2)
        self.layer4 = self._make_layer(BasicBlock, self.widths[3], int(layers[3]), stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(self.widths[3] * BasicBlock.expansion, num_classes)

        # Same initialisation as torchvision's ResNet.
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d | nn.GroupNorm):
                nn.init.constant_(m.weight, 1)
                nn.init.constant_(m.bias, 0)
        if zero_init_residual:
            for m in self.modules():
                if isinstance(m, BasicBlock):
                    nn.init.constant_(m.bn2.weight, 0)

        # torchvision uses in-place ReLUs; they overwrite the output of the preceding
        # BatchNorm, which silently corrupts tensors captured by forward hooks (feature
        # distillation captures activations). The memory saving is negligible here.
        for m in self.modules():
            if isinstance(m, nn.ReLU):
                m.inplace = False


def cifar_resnet18(num_classes: int = 10, in_channels: int = 3, width: int = 64) -> CifarResNet:
    """ResNet-18 (BasicBlock, [2, 2, 2, 2]) with a 3x3 stride-1 stem and no max-pool.

    ``width`` scales the stage widths ``width * (1, 2, 4, 8)``; 64 is the standard network.
    """
    return CifarResNet([2, 2, 2, 2], num_classes=num_classes, in_channels=in_channels, width=width)


def cifar_resnet34(num_classes: int = 10, in_channels: int = 3, width: int = 64) -> CifarResNet:
    """ResNet-34 (BasicBlock, [3, 4, 6, 3]) with a 3x3 stride-1 stem and no max-pool.

    ``width`` scales the stage widths ``width * (1, 2, 4, 8)``; 64 is the standard network.
    """
    return CifarResNet([3, 4, 6, 3], num_classes=num_classes, in_channels=in_channels, width=width)


def small_resnet(
    num_classes: int = 10,
    in_channels: int = 1,
    width: int = 16,
    blocks: Sequence[int] = (1, 1, 1, 1),
) -> CifarResNet:
    """A narrow ResNet (stage widths ``width * (1, 2, 4, 8)``) for quick CPU runs.

    With the defaults (16..128 channels, one block per stage) it has ~0.3M parameters and
    trains on 8x8 / 16x16 digit images in seconds on a CPU.
    """
    return CifarResNet(blocks, num_classes=num_classes, in_channels=in_channels, width=width)


MODEL_REGISTRY: dict[str, Callable[..., nn.Module]] = {
    "cifar_resnet18": cifar_resnet18,
    "cifar_resnet34": cifar_resnet34,
    "small_resnet": small_resnet,
}


def build_model(name: str, **kwargs: object) -> nn.Module:
    """Build a registered model by name, forwarding ``kwargs`` to its constructor."""
    try:
        fn = MODEL_REGISTRY[name]
    except KeyError:
        known = ", ".join(sorted(MODEL_REGISTRY))
        raise ValueError(f"unknown model {name!r}; known models: {known}") from None
    return fn(**kwargs)
