"""NxMesh benchmarks: ``python -m bench.run [--quick] [--only NAME]`` runs them all.

Each benchmark is also a script of its own (``python bench/render_bench.py``); shared
helpers live in `bench.common`, the summary and plots in `bench.report`. See
``docs/benchmarks.md``.
"""
