"""``python -m tnexp.profiling``: the profiling stage from plain arguments (see --help)."""

from tnexp.stages.profile import main

main()
