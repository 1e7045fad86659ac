"""LightningDataModules: digits (quickstart), CIFAR-10/100, Fashion-MNIST, text corpora."""

from tnexp.data.cifar import CIFAR10DataModule, CIFAR100DataModule, CIFARDataModule
from tnexp.data.digits import DigitsDataModule
from tnexp.data.fashion_mnist import FashionMNISTDataModule
from tnexp.data.subsets import balanced_subset_indices, stratified_split_indices
from tnexp.data.text import TextDataModule

__all__ = [
    "CIFAR10DataModule",
    "CIFAR100DataModule",
    "CIFARDataModule",
    "DigitsDataModule",
    "FashionMNISTDataModule",
    "TextDataModule",
    "balanced_subset_indices",
    "stratified_split_indices",
]
