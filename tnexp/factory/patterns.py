"""Module-path patterns of tensorization rules: path globs over dotted module names.

A pattern is matched against the whole dotted path of a module (``encoder.layer.3.output.dense``)
component by component, like a file-path glob whose separator is ``.``:

* ``*`` matches any characters *within one component* (never a dot):
  ``encoder.layer.*.output.dense`` selects ``encoder.layer.3.output.dense`` but not
  ``encoder.layer.3.attention.output.dense``;
* ``**`` as a whole component matches zero or more components: ``encoder.**.dense`` selects every
  ``dense`` below ``encoder``; ``**`` alone selects every module;
* ``?`` matches one character of a component, ``[abc]`` / ``[!abc]`` one character from a set;
* a pattern without wildcards is an exact module path.
"""

from __future__ import annotations

import difflib
import fnmatch
import functools
import re
from collections.abc import Sequence

from tnexp.tn.errors import TensorizationError

__all__ = ["compile_pattern", "match_pattern", "no_match_error"]


def _component_regex(component: str) -> str:
    """Regex for one dotted component: ``*`` and ``?`` never cross a dot."""
    out, i = [], 0
    while i < len(component):
        c = component[i]
        if c == "*":
            while i + 1 < len(component) and component[i + 1] == "*":
                i += 1  # '**' inside a component ('layer**') is a plain '*' there
            out.append("[^.]*")
        elif c == "?":
            out.append("[^.]")
        elif c == "[":
            end = component.find("]", i + 2 if component[i + 1 : i + 2] in ("!", "]") else i + 1)
            if end < 0:
                out.append(re.escape(c))
            else:
                body = component[i + 1 : end]
                if body.startswith("!"):
                    body = "^" + body[1:]
                out.append("[" + body.replace("\\", "\\\\") + "]")
                i = end
        else:
            out.append(re.escape(c))
        i += 1
    return "".join(out)


@functools.lru_cache(maxsize=1024)
def compile_pattern(pattern: str) -> re.Pattern[str]:
    """The compiled regex of a rule pattern (see the module docstring for the syntax)."""
    parts = pattern.split(".")
    regex = ""
    for index, part in enumerate(parts):
        first, last = index == 0, index == len(parts) - 1
        if part == "**":
            if first and last:
                regex += ".*"
            elif first:
                regex += r"(?:.+\.)?"  # zero or more leading components, then a dot
            elif last:
                regex += r"(?:\..+)?"  # the prefix itself, or anything below it
            else:
                regex += r"(?:\..+)?\."  # zero or more components between two dots
            continue
        if not first and parts[index - 1] != "**":
            regex += r"\."
        regex += _component_regex(part)
    return re.compile(regex + r"\Z", re.DOTALL)


def match_pattern(name: str, pattern: str) -> bool:
    """Whether the module path ``name`` is selected by ``pattern``."""
    return name == pattern or compile_pattern(pattern).match(name) is not None


def no_match_error(what: str, pattern: str, candidates: Sequence[str]) -> TensorizationError:
    """The error for a rule / exclusion that selects nothing, with close names as hints."""
    close = difflib.get_close_matches(pattern, candidates, n=5, cutoff=0.3)
    hint = f" Close names: {close}." if close else ""
    sample = list(candidates[:8])
    wider = ""
    if any(fnmatch.fnmatchcase(n, pattern) for n in candidates):  # matched before '**' existed
        wider = (
            " ('*' matches within one dotted component only; use '**' to cross components, "
            "e.g. 'encoder.**.dense'.)"
        )
    return TensorizationError(
        f"{what} {pattern!r} matches no tensorizable module (nn.Conv2d, nn.Linear, Conv1D).{hint}"
        f"{wider} Module paths look like {sample}; patterns are globs over dotted module paths "
        "('*' within one component, '**' across components) such as 'layer*.*.conv*' or "
        "'transformer.h.*.mlp.c_fc'."
    )
