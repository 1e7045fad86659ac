"""LightningDataModules and shared index-selection helpers."""

from tnexp.data.digits import DigitsDataModule
from tnexp.data.subsets import balanced_subset_indices, stratified_split_indices

__all__ = ["DigitsDataModule", "balanced_subset_indices", "stratified_split_indices"]
