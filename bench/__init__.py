"""Benchmarks of pabx-worker against two peers doing the same job (issue 5).

``python -m bench`` (``make bench``): see :mod:`bench.__main__` for the options and
:mod:`bench.harness` for what is measured and how.
"""
