"""The ``tnexp-aggregate`` command line."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from tnexp.aggregate.build import TABLE_GROUPS, aggregate
from tnexp.aggregate.common import AggregateError


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="tnexp-aggregate",
        description="Aggregate tnexp run folders (results.json) into the paper's tables "
        "(Markdown + CSV) and figures (PNG), beside the paper's published figures.",
    )
    p.add_argument("paths", nargs="+", help="run folders, multirun folders or trees of them")
    p.add_argument("--out", required=True, help="output folder (tables/, figures/)")
    p.add_argument(
        "--tables",
        default="all",
        help=f"'all' or a comma-separated list among: {', '.join(TABLE_GROUPS)}",
    )
    p.add_argument(
        "--compare-to",
        default=None,
        help="paper data set (cifar10, cifar100) for classification runs that set no "
        "compare_to and whose data set is not in the paper",
    )
    p.add_argument(
        "--reference",
        default=None,
        help="paper figures YAML (default: experiments/paper_reference.yaml)",
    )
    p.add_argument("--no-figures", action="store_true", help="write tables only")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``tnexp-aggregate``; returns the exit status."""
    args = _parser().parse_args(argv)
    try:
        result = aggregate(
            args.paths,
            args.out,
            tables=args.tables,
            compare_to=args.compare_to,
            reference=args.reference,
            figures=not args.no_figures,
        )
    except AggregateError as err:
        print(f"tnexp-aggregate: error: {err}", file=sys.stderr)
        return 2
    print(result.markdown)
    for i in result.incomplete:
        print(f"tnexp-aggregate: incomplete run {i.path}: {i.reason}", file=sys.stderr)
    if not any(not r.problems for r in result.runs):
        # Scripts and CI must see that there was nothing to aggregate.
        found = len(result.incomplete) + len(result.runs)
        print(
            f"tnexp-aggregate: error: none of the {found} run folder(s) under "
            f"{' '.join(args.paths)} finished (no complete results.json); fix or rerun them "
            "(resume=auto continues a run from its folder).",
            file=sys.stderr,
        )
        return 1
    print(f"tables: {Path(args.out) / 'tables'}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
