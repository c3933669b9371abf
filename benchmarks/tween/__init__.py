"""Loom's Neural Tweening benchmarks (tests 13–19) with seeds, held-out data and baselines.

``python -m benchmarks.tween --quick`` runs the small suite; see ``RESULTS.md``.
Modules: ``data`` (generators and the chase/avoid environment), ``archs`` (Loom's networks,
faithful and fixed), ``runners`` (one run of one mode), ``suite`` (tests and tables),
``report`` (statistics, Markdown, Loom's JSON schema).
"""
