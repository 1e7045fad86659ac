"""The stages of the ``tnexp`` command, one module each, over one build step (build.py).

``tnexp.run.run`` dispatches ``method=<name>`` to a stage here; every stage sets itself up
with :func:`tnexp.stages.build.build` and reports through :class:`tnexp.results.Results`.
See docs/architecture.md for the flow.
"""
