"""Test helpers for NxMesh and its plugins.

- A pytest plugin (auto-loaded through the ``pytest11`` entry point) with fixtures:
  ``make_plugin_manager``, ``register_plugin`` and an ``anyio_backend`` fixture that
  runs every ``@pytest.mark.anyio`` test on asyncio *and* trio.
- Contract suites in `nxmesh.testing.contracts`: subclass one, provide its fixture, and
  your provider is held to the same behaviour as the built-ins::

      from nxmesh.testing.contracts import EventBusContract

      class TestMyBus(EventBusContract):
          @pytest.fixture
          def bus_factory(self):
              return lambda: MyBus("my://")
"""

from nxmesh.testing.factories import make_state, make_version
from nxmesh.testing.hooks import PluginRegistrar

__all__ = ["PluginRegistrar", "make_state", "make_version"]
