"""Model constructors (CIFAR ResNets, HF causal LMs) and the name registry used by configs."""

from tnexp.models.hf import build_causal_lm, load_causal_lm, load_tokenizer, tiny_gpt2
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
    "build_causal_lm",
    "build_model",
    "cifar_resnet18",
    "cifar_resnet34",
    "load_causal_lm",
    "load_tokenizer",
    "small_resnet",
    "tiny_gpt2",
]
