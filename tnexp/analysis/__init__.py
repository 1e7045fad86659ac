"""Analyses that tensor networks make possible: bond spectra and entanglement entropy."""

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
    "analyze_spectra",
    "energy_rank",
    "entanglement_entropy",
    "mpo_cut_spectra",
    "read_json",
    "truncation_error",
    "tucker_mode_spectra",
    "write_csv",
    "write_json",
    "write_plots",
]
