"""The pluggy markers. Plugin authors import `hookimpl` from `nxmesh` itself."""

from __future__ import annotations

import pluggy

PROJECT_NAME = "nxmesh"
"""Name of the pluggy project and of the entry-point group plugins register under."""

hookspec = pluggy.HookspecMarker(PROJECT_NAME)
hookimpl = pluggy.HookimplMarker(PROJECT_NAME)
