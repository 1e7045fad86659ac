"""Turn run directories into the paper's tables (Markdown + CSV) and figures (PNG).

Reads only the ``results.json`` each stage writes (through :func:`load_run_record`), plus
the paper's published figures (``experiments/paper_reference.yaml``); no network, no W&B.
How runs are found, grouped and tabulated: ``docs/aggregation.md``. Modules:

* ``record``: reading one run's results.json (:func:`load_run_record`) and :class:`Run`;
* ``discovery``: :func:`find_runs` walks run folders, sweep folders and trees of them;
* ``grouping``: paper data set per run, seeds of one setting, LM groups, sweep groups;
* ``accuracy`` / ``lm`` / ``sweeps``: the classification, language-model and sweep tables;
* ``aggregation``: :class:`Aggregation`, all tables of a set of runs;
* ``table`` / ``figures``: Markdown/CSV tables and PNG figures;
* ``build``: :func:`aggregate`; ``cli``: the ``tnexp-aggregate`` command.

Command: ``uv run tnexp-aggregate <run dirs...> --out <dir>``.
"""

from tnexp.aggregate.aggregation import Aggregation
from tnexp.aggregate.build import AggregateResult, aggregate
from tnexp.aggregate.cli import main
from tnexp.aggregate.common import AggregateError, makespan
from tnexp.aggregate.discovery import find_runs
from tnexp.aggregate.record import Incomplete, Run, UnreadableRecord, load_run_record
from tnexp.aggregate.reference import Reference, load_reference
from tnexp.aggregate.table import Column, Table

__all__ = [
    "AggregateError",
    "AggregateResult",
    "Aggregation",
    "Column",
    "Incomplete",
    "Reference",
    "Run",
    "Table",
    "UnreadableRecord",
    "aggregate",
    "find_runs",
    "load_reference",
    "load_run_record",
    "main",
    "makespan",
]
