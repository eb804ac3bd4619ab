"""Runestone's bench harness: fake servers, load generators, scenarios and the report.

Nothing here is imported by the gateway. ``python -m bench.run`` is the entry point; see
``bench/README.md``.
"""
