"""Slice-parallel local tensorization: per-slice jobs on Hydra launchers, then assemble.

The bookkeeping lives in :mod:`tnexp.slice_jobs.store` (selection, identities, run file,
records, checks) and :mod:`tnexp.slice_jobs.job` (one job's records and weights); the
stages that use it in :mod:`tnexp.stages` (train, assemble, capture). See
docs/scale_out.md.
"""

from tnexp.slice_jobs.job import SliceJobOutput, SliceLossRecorder
from tnexp.slice_jobs.store import (
    RECORD_FILE,
    RUN_FILE,
    SLICES_DIR,
    WEIGHTS_FILE,
    SliceJobsError,
    check_slice_outputs,
    job_count,
    job_slice_indices,
    read_slice_records,
    select_slices,
    spec_hash,
    sweep_hint,
)

__all__ = [
    "RECORD_FILE",
    "RUN_FILE",
    "SLICES_DIR",
    "WEIGHTS_FILE",
    "SliceJobOutput",
    "SliceJobsError",
    "SliceLossRecorder",
    "check_slice_outputs",
    "job_count",
    "job_slice_indices",
    "read_slice_records",
    "select_slices",
    "spec_hash",
    "sweep_hint",
]
