"""Property-based fuzzing of the whole API from its own ``/openapi.json``: no input, valid
or invalid, may produce a server error (5xx)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from schemathesis import GenerationMode
from schemathesis.python import asgi as schemathesis_asgi

from nxmesh.core.pluginmanager import get_plugin_manager
from nxmesh.master.app import MasterServices, build_app

from .conftest import make_settings

EXAMPLES = {GenerationMode.POSITIVE: 5, GenerationMode.NEGATIVE: 2}
"""Examples per operation and mode: bounded so the whole run stays within seconds."""


@pytest.fixture(scope="module")
def fuzzed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Any, str]]:
    """The schema loaded from the running app, and an admin token to call it with."""
    pm = get_plugin_manager(autoload=False, environ={})
    state: Path = tmp_path_factory.mktemp("fuzz") / "state"
    app = build_app(pm=pm, settings=make_settings(pm, state))
    schema = schemathesis.openapi.from_asgi("/openapi.json", app)  # starts the app's lifespan
    services: MasterServices = app.state.services
    token = services.auth.tokens.issue("admin", ["admin"], authenticator="password").token
    try:
        yield schema, token
    finally:
        # Schemathesis keeps the lifespan running until exit; end it with the module.
        schemathesis_asgi.shutdown_lifespans()


class TestFuzzing:
    """Generated requests against every operation."""

    @pytest.mark.parametrize("mode", list(EXAMPLES), ids=lambda m: m.value)
    def test_no_server_errors(self, fuzzed: tuple[Any, str], mode: GenerationMode) -> None:
        """Every operation, given schema-conforming (or violating) input, answers below 500."""
        schema, token = fuzzed
        headers = {"Authorization": f"Bearer {token}"}
        failures: list[str] = []
        calls = operations = 0
        for result in schema.get_all_operations():
            operation = result.ok()
            if (
                mode is GenerationMode.NEGATIVE
                and not operation.body
                and not any(True for _ in operation.iter_parameters())
            ):
                continue  # nothing to make invalid
            operations += 1

            @settings(
                max_examples=EXAMPLES[mode],
                deadline=None,
                database=None,
                derandomize=True,
                phases=[Phase.explicit, Phase.generate],
                suppress_health_check=list(HealthCheck),
            )
            @given(case=operation.as_strategy(generation_mode=mode))
            def call(case: Any) -> None:
                nonlocal calls
                calls += 1
                response = case.call(headers=headers)
                if response.status_code >= 500:
                    raise AssertionError(
                        f"{case.method} {case.formatted_path} -> {response.status_code}: "
                        f"{response.text[:300]} (query={case.query!r}, body={case.body!r})"
                    )

            try:
                call()
            except AssertionError as exc:
                failures.append(f"{operation.label}: {exc}")
        assert operations > 40, "the schema lists almost no operations"
        assert calls >= operations, "fewer requests than operations: generation is broken"
        assert not failures, "\n".join(failures)
