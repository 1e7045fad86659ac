"""Analyses that tensor networks make possible: bond spectra, entanglement entropy, error
propagation across slices."""

from tnexp.analysis.propagation import (
    ReplacementStep,
    SliceError,
    progressive_replacement,
    propagation_errors,
    write_propagation,
)
from tnexp.analysis.report import read_json, write_csv, write_json, write_plots
from tnexp.analysis.spectra import (
    CutSpectrum,
    LayerSpectrum,
    analyze_spectra,
    energy_rank,
    entanglement_entropy,
    mpo_cut_spectra,
    truncation_error,
    tucker_mode_spectra,
)

__all__ = [
    "CutSpectrum",
    "LayerSpectrum",
    "ReplacementStep",
    "SliceError",
    "analyze_spectra",
    "energy_rank",
    "entanglement_entropy",
    "mpo_cut_spectra",
    "progressive_replacement",
    "propagation_errors",
    "read_json",
    "truncation_error",
    "tucker_mode_spectra",
    "write_csv",
    "write_json",
    "write_plots",
    "write_propagation",
]
