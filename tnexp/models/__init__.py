"""Model constructors (CIFAR ResNets) and the name registry used by configs."""

from tnexp.models.resnet import (
    MODEL_REGISTRY,
    CifarResNet,
    build_model,
    cifar_resnet18,
    cifar_resnet34,
    small_resnet,
)

__all__ = [
    "MODEL_REGISTRY",
    "CifarResNet",
    "build_model",
    "cifar_resnet18",
    "cifar_resnet34",
    "small_resnet",
]
