"""Aggregate tnexp runs into the paper's tables and figures.

The same command as ``uv run tnexp-aggregate`` (the logic lives in ``tnexp/aggregate/``):

    uv run python experiments/aggregate.py outputs/ multirun/ --out results/
    uv run python experiments/aggregate.py multirun/sweep_local_bs --out results/ --tables sweeps

See docs/aggregation.md.
"""

from __future__ import annotations

import sys

from tnexp.aggregate import main

if __name__ == "__main__":
    sys.exit(main())
