"""Run ``nxmesh`` with this process's wall clock shifted, like libfaketime would.

    CHAOS_CLOCK_OFFSET=600 python chaos/skewed_agent.py --config agent.toml agent

(Not an ``NXMESH_*`` variable: those are settings, and unknown ones are refused.)
`time.time` and `time.time_ns` are replaced *before* NxMesh is imported, so every
timestamp the agent puts on its envelopes (and everything else it reads the wall clock
for) is `offset` seconds off; the monotonic clock, the kernel and OpenSSL keep the real
time, as with a host whose NTP is broken. Used by the ``clock_skew`` chaos case.
"""

from __future__ import annotations

import os
import sys
import time

OFFSET = float(os.environ.get("CHAOS_CLOCK_OFFSET", "0"))
_real_time = time.time
_real_time_ns = time.time_ns


def _skewed_time() -> float:
    return _real_time() + OFFSET


def _skewed_time_ns() -> int:
    return _real_time_ns() + int(OFFSET * 1e9)


time.time = _skewed_time
time.time_ns = _skewed_time_ns

if __name__ == "__main__":
    from nxmesh.cli import main

    main(sys.argv[1:])
