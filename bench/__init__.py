"""Benchmarks of pabx-worker against two peers doing the same job (issues 5 and 15).

``python -m bench`` (``make bench``): see :mod:`bench.__main__` for the options and
:mod:`bench.scenarios` for what is measured and how. The parts: ``options`` (kinds,
options), ``processes`` (simulator, consumers), ``broker`` (publishing, the outcome reader),
``sampling`` (RSS, CPU, latency summaries), ``context``, ``scenarios`` (one module each),
``results`` (typed results and their JSON), ``verdicts`` (ratios, targets), ``run``, ``report``.
"""
