"""Each hook reaches its implementations the way its spec documents."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from nxmesh import ApplyReport, Event, PendingApply, Problem, ValidationError, hookimpl
from nxmesh.cli import build_cli
from nxmesh.core.observers import api_routes, apply_veto, dispatch_event, notify_after_apply
from nxmesh.core.pluginmanager import NxMeshPluginManager
from nxmesh.core.policy import enforce_policy, policy_problems
from nxmesh.core.registry import PROVIDER_HOOKS, ProviderRegistries
from nxmesh.testing import make_state

Factory = Callable[..., NxMeshPluginManager]


def _provider(kind: str) -> type:
    return type(f"Fake{kind.title()}", (), {"name": f"fake-{kind}", "schemes": (f"fake{kind}",)})


class TestProviderHooks:
    @pytest.mark.parametrize(
        ("kind", "hook"),
        sorted(PROVIDER_HOOKS.items()),
    )
    def test_registered_class_lands_in_its_registry(
        self, make_plugin_manager: Factory, kind: str, hook: str
    ) -> None:
        """A class returned from each nxmesh_register_* hook is found by name in its kind."""
        cls = _provider(kind)
        plugin = type("Plug", (), {hook: hookimpl(staticmethod(lambda: [cls]))})()
        registries = ProviderRegistries.collect(make_plugin_manager(plugin))
        assert registries[kind].get(f"fake-{kind}") is cls

    def test_all_provider_hook_names_are_spelled_out(self) -> None:
        """The registry knows the hook of every provider family."""
        assert set(PROVIDER_HOOKS.values()) == {
            "nxmesh_register_storage_backends",
            "nxmesh_register_transports",
            "nxmesh_register_authenticators",
            "nxmesh_register_renderers",
            "nxmesh_register_deployment_modes",
            "nxmesh_register_nginx_drivers",
            "nxmesh_register_health_checks",
            "nxmesh_register_event_buses",
            "nxmesh_register_dns_providers",
        }

    def test_template_paths_are_collected(
        self, make_plugin_manager: Factory, tmp_path: Path
    ) -> None:
        """nxmesh_template_paths results from every plugin are gathered."""

        class Plug:
            @hookimpl
            def nxmesh_template_paths(self) -> Sequence[Path]:
                return [tmp_path]

        results = make_plugin_manager(Plug()).hook.nxmesh_template_paths()
        assert [tmp_path] in results


class TestPolicyHook:
    def test_errors_block_and_warnings_pass_through(self, make_plugin_manager: Factory) -> None:
        """nxmesh_validate_state errors raise ValidationError; warnings are returned."""

        class Strict:
            @hookimpl
            def nxmesh_validate_state(self, state: Any) -> Sequence[Problem]:
                if len(state.sites) > 1:
                    return [Problem("sites", "at most one site allowed here")]
                return [Problem("sites[0]", "consider TLS", severity="warning")]

        pm = make_plugin_manager(Strict())
        assert [p.severity for p in enforce_policy(pm, make_state(1))] == ["warning"]
        assert len(policy_problems(pm, make_state(2))) == 1
        with pytest.raises(ValidationError, match="at most one site"):
            enforce_policy(pm, make_state(2))


class TestObserverHooks:
    def test_before_apply_veto_reasons_are_joined(self, make_plugin_manager: Factory) -> None:
        """Any non-empty nxmesh_before_apply answer vetoes; None from all lets it through."""
        update = PendingApply(version=3, digest="d" * 64, state=make_state(1))

        class Freeze:
            @hookimpl
            def nxmesh_before_apply(self, update: PendingApply) -> str | None:
                return "change freeze" if update.version > 2 else None

        assert apply_veto(make_plugin_manager(Freeze()), update) == "change freeze"
        assert apply_veto(make_plugin_manager(), update) is None

    def test_after_apply_observer_errors_do_not_stop_others(
        self, make_plugin_manager: Factory
    ) -> None:
        """A failing nxmesh_after_apply observer is logged; the next one still runs."""
        seen: list[str] = []

        class Broken:
            @hookimpl
            def nxmesh_after_apply(self, report: ApplyReport) -> None:
                raise RuntimeError("observer bug")

        class Recorder:
            @hookimpl
            def nxmesh_after_apply(self, report: ApplyReport) -> None:
                seen.append(report.outcome)

        pm = make_plugin_manager(Broken(), Recorder())
        notify_after_apply(
            pm, ApplyReport(agent_id="a", version=1, digest="d" * 64, outcome="applied")
        )
        assert seen == ["applied"]

    def test_on_event_reaches_every_observer_despite_failures(
        self, make_plugin_manager: Factory
    ) -> None:
        """nxmesh_on_event is delivered to all observers even when one raises."""
        seen: list[str] = []

        class Recorder:
            @hookimpl
            def nxmesh_on_event(self, event: Event) -> None:
                seen.append(event.kind)

        class Broken:
            @hookimpl
            def nxmesh_on_event(self) -> None:
                raise ValueError("boom")

        dispatch_event(make_plugin_manager(Recorder(), Broken()), Event(kind="version.created"))
        assert seen == ["version.created"]

    def test_api_routes_are_flattened_in_plugin_order(self, make_plugin_manager: Factory) -> None:
        """nxmesh_api_routes lists from several plugins become one list."""

        class One:
            @hookimpl
            def nxmesh_api_routes(self) -> Sequence[str]:
                return ["route-a"]

        class Two:
            @hookimpl
            def nxmesh_api_routes(self) -> Sequence[str]:
                return ["route-b", "route-c"]

        assert api_routes(make_plugin_manager(One(), Two())) == ["route-a", "route-b", "route-c"]


class TestCliHook:
    def test_plugins_add_commands(self, install_fake_distribution: Callable[..., None]) -> None:
        """An installed plugin's nxmesh_cli_commands adds a working subcommand to nxmesh."""
        install_fake_distribution(
            "nxmesh-greeter",
            {"greeter": "nxmesh_greeter_mod"},
            {
                "nxmesh_greeter_mod": """
                import click
                from nxmesh import hookimpl

                @click.command("greet")
                def greet():
                    click.echo("hello operator")

                @hookimpl
                def nxmesh_cli_commands(cli):
                    cli.add_command(greet)
            """
            },
        )
        result = CliRunner().invoke(build_cli([]), ["greet"])
        assert result.exit_code == 0, result.output
        assert "hello operator" in result.output
