"""NxMesh fault-injection suite: ``python -m chaos.run [--quick] [--only CASE]``.

Each case (`chaos.cases`) breaks something real on loopback — kills a master, an agent,
nginx, stops PostgreSQL, skews a clock, floods versions — and checks explicit pass/fail
criteria within a time bound, restoring everything it touched. Results go to
``chaos/results/<case>.json`` and ``chaos/results/SUMMARY.md``. See
``docs/benchmarks.md``.
"""
