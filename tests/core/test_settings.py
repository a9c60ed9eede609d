"""Settings: defaults, file, environment and flags in that order; typos and bad values refused."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import attrs
import pytest

from nxmesh.core.errors import ConfigurationError
from nxmesh.core.markers import hookimpl
from nxmesh.core.pluginmanager import NxMeshPluginManager, get_plugin_manager
from nxmesh.core.settings import (
    SECRET_METADATA,
    Settings,
    SettingsRegistry,
    load_settings,
    plugin_manager_options,
    settings_as_dict,
)


@attrs.frozen
class HelloSettings:
    """The settings section of the test plugin ``hello``."""

    greeting: str = "hello"
    times: int = attrs.field(default=1, validator=attrs.validators.ge(1))
    loud: bool = False
    webhook_token: str = attrs.field(default="", repr=False)


class HelloPlugin:
    """Declares ``[plugins.hello]`` and remembers the settings it was configured with."""

    def __init__(self) -> None:
        self.configured: list[Settings] = []

    @hookimpl
    def nxmesh_add_settings(self, registry: SettingsRegistry) -> None:
        registry.add_section("hello", HelloSettings)

    @hookimpl
    def nxmesh_configure(self, settings: Settings) -> None:
        self.configured.append(settings)


def manager(*plugins: tuple[str, object], disabled: tuple[str, ...] = ()) -> NxMeshPluginManager:
    return get_plugin_manager(autoload=False, plugins=plugins, environ={}, disabled=disabled)


@pytest.fixture(autouse=True)
def _isolated_cwd(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """No test picks up an ``nxmesh.toml`` lying in the directory pytest was started from."""
    monkeypatch.chdir(tmp_path)


@pytest.fixture
def pm() -> NxMeshPluginManager:
    return manager(("hello", HelloPlugin()))


@pytest.fixture
def write_config(tmp_path: Path) -> Any:
    def write(text: str, name: str = "nxmesh.toml") -> Path:
        path = tmp_path / name
        path.write_text(text)
        return path

    return write


class TestDefaults:
    def test_nothing_configured_gives_the_class_defaults(self, pm: NxMeshPluginManager) -> None:
        """Without file, environment or flags, every value is its documented default."""
        settings = load_settings(pm, environ={})
        assert settings.master.api_port == 8470
        assert settings.agent.transports == ("grpc", "websocket")
        assert settings.state_dir == Path(".nxmesh")
        assert settings.plugin("hello") == HelloSettings()
        # Built-in plugins declare sections of their own; the core fields are all defaults.
        assert attrs.evolve(settings, plugins={}) == Settings()
        assert settings.plugins["hello"] == HelloSettings()

    def test_empty_storage_url_means_sqlite_in_the_state_dir(self) -> None:
        """effective_storage_url falls back to master.db inside state_dir."""
        assert Settings(state_dir=Path("/srv/nx")).effective_storage_url() == (
            "sqlite:////srv/nx/master.db"
        )
        assert Settings(storage_url="postgresql://db/nx").effective_storage_url() == (
            "postgresql://db/nx"
        )

    def test_settings_are_frozen(self) -> None:
        """Loaded settings cannot be changed behind the application's back."""
        settings = Settings(agent=attrs.evolve(Settings().agent, labels={"env": "prod"}))
        with pytest.raises(attrs.exceptions.FrozenInstanceError):
            settings.workspace = "other"  # type: ignore[misc]
        with pytest.raises(TypeError):
            settings.agent.labels["env"] = "dev"  # type: ignore[index]


class TestSources:
    def test_file_beats_defaults(self, pm: NxMeshPluginManager, write_config: Any) -> None:
        """Values from the TOML file replace the defaults, nested tables included."""
        path = write_config('workspace = "edge"\n[master]\napi_port = 9000\n')
        settings = load_settings(pm, path=path, environ={})
        assert settings.workspace == "edge"
        assert settings.master.api_port == 9000
        assert settings.master.grpc_port == 8471

    def test_env_beats_file(self, pm: NxMeshPluginManager, write_config: Any) -> None:
        """An NXMESH_* variable wins over the same key in the file."""
        path = write_config('log_level = "warning"\n[master]\napi_port = 9000\n')
        env = {"NXMESH_LOG_LEVEL": "debug", "NXMESH_MASTER__API_PORT": "9100"}
        settings = load_settings(pm, path=path, environ=env)
        assert settings.log_level == "debug"
        assert settings.master.api_port == 9100

    def test_overrides_beat_env(self, pm: NxMeshPluginManager) -> None:
        """Command-line overrides win over the environment; None means 'flag not given'."""
        env = {"NXMESH_MASTER__API_PORT": "9100", "NXMESH_WORKSPACE": "edge"}
        overrides = {"master.api_port": 9200, "workspace": None, "agent": {"metrics_port": "1"}}
        settings = load_settings(pm, environ=env, overrides=overrides)
        assert settings.master.api_port == 9200
        assert settings.workspace == "edge"
        assert settings.agent.metrics_port == 1

    def test_config_file_from_env_then_cwd(
        self, pm: NxMeshPluginManager, write_config: Any
    ) -> None:
        """NXMESH_CONFIG names the file; otherwise ./nxmesh.toml is read when present."""
        other = write_config('workspace = "from-env-file"\n', name="other.toml")
        write_config('workspace = "from-cwd"\n')
        assert load_settings(pm, environ={}).workspace == "from-cwd"
        env = {"NXMESH_CONFIG": str(other)}
        assert load_settings(pm, environ=env).workspace == "from-env-file"

    def test_named_file_must_exist(self, pm: NxMeshPluginManager, tmp_path: Path) -> None:
        """A file named explicitly but missing is an error, not silently the defaults."""
        with pytest.raises(ConfigurationError, match="config file not found"):
            load_settings(pm, path=tmp_path / "missing.toml", environ={})

    def test_unparsable_file_names_the_file(
        self, pm: NxMeshPluginManager, write_config: Any
    ) -> None:
        """A TOML syntax error names the file it is in."""
        path = write_config("workspace = \n")
        with pytest.raises(ConfigurationError, match=r"cannot parse config file .*nxmesh\.toml"):
            load_settings(pm, path=path, environ={})


class TestUnknownKeys:
    def test_typo_in_file_suggests_the_key(
        self, pm: NxMeshPluginManager, write_config: Any
    ) -> None:
        """A misspelt key in the file is refused with the closest real key."""
        write_config("[master]\napi_prot = 9000\n")
        with pytest.raises(ConfigurationError) as info:
            load_settings(pm, environ={})
        assert str(info.value) == (
            "unknown setting 'master.api_prot' in nxmesh.toml; did you mean 'api_port'?"
        )

    def test_every_problem_of_a_file_is_reported_at_once(
        self, pm: NxMeshPluginManager, write_config: Any
    ) -> None:
        """Two typos and a bad value: all three in one error, not one per attempt."""
        path = write_config(
            "[agent]\nconf_dri = '/etc/nginx'\nmetrics_port = 'abc'\n[master]\napi_prot = 1\n"
        )
        with pytest.raises(ConfigurationError) as info:
            load_settings(pm, path=path, environ={"NXMESH_AGENT__BOGUS": "1"})
        lines = str(info.value).splitlines()
        assert lines[0] == "4 problems in the settings:"
        assert lines[1].startswith("  - unknown setting 'agent.conf_dri'")
        assert "did you mean 'api_port'?" in lines[2]
        assert lines[3].startswith("  - unknown setting in environment variable NXMESH_AGENT")
        assert lines[4].startswith("  - invalid value for setting 'agent.metrics_port'")

    def test_range_checks_are_reported_with_the_unknown_keys(
        self, pm: NxMeshPluginManager, write_config: Any
    ) -> None:
        """A value of the right type that its table's validator refuses (a port out of
        range, in two tables) is reported beside an unknown key, not one round later."""
        path = write_config(
            "[agent]\nconf_dri = '/x'\nmetrics_port = 99999\nhealth_interval = -3\n"
            "[master]\napi_port = 70000\n"
        )
        with pytest.raises(ConfigurationError) as info:
            load_settings(pm, path=path, environ={})
        lines = str(info.value).splitlines()
        assert lines[0] == "4 problems in the settings:"
        assert lines[1].startswith("  - unknown setting 'agent.conf_dri'")
        assert {line.split("'")[1] for line in lines[2:]} == {
            "agent.metrics_port",
            "agent.health_interval",
            "master.api_port",
        }
        assert all("must be" in line for line in lines[2:])

    def test_typo_in_env_suggests_the_variable(self, pm: NxMeshPluginManager) -> None:
        """A misspelt NXMESH_* variable is refused with the closest real variable."""
        with pytest.raises(ConfigurationError, match="NXMESH_MASTER__API_PROT") as info:
            load_settings(pm, environ={"NXMESH_MASTER__API_PROT": "9000"})
        assert "did you mean 'NXMESH_MASTER__API_PORT'?" in str(info.value)

    def test_unknown_plugin_section_suggests_a_declared_one(
        self, pm: NxMeshPluginManager, write_config: Any
    ) -> None:
        """A [plugins.x] table no loaded plugin declared is refused."""
        path = write_config("[plugins.helo]\ngreeting = 'hi'\n")
        with pytest.raises(ConfigurationError, match=r"'plugins\.helo'.*did you mean 'hello'"):
            load_settings(pm, path=path, environ={})

    def test_typo_inside_plugin_section(self, pm: NxMeshPluginManager) -> None:
        """Plugin sections are checked as strictly as the core ones."""
        with pytest.raises(ConfigurationError, match="NXMESH_PLUGINS__HELLO__GREETING"):
            load_settings(pm, environ={"NXMESH_PLUGINS__HELLO__GRETING": "hi"})

    def test_disabled_plugin_keeps_its_section(self, write_config: Any) -> None:
        """Blocking a plugin does not turn its configuration into an error."""
        pm = manager(("hello", HelloPlugin()), disabled=("hello",))
        path = write_config("[plugins.hello]\ngreeting = 'hi'\n")
        settings = load_settings(pm, path=path, environ={"NXMESH_PLUGINS__HELLO__LOUD": "1"})
        assert "hello" not in settings.plugins

    def test_reserved_and_foreign_variables_are_ignored(self, pm: NxMeshPluginManager) -> None:
        """Plugin-manager switches, NXMESH_TEST_* and non-NXMESH variables are not settings."""
        env = {
            "NXMESH_DISABLE_PLUGIN_AUTOLOAD": "1",
            "NXMESH_TEST_POSTGRES_URL": "postgresql://x",
            "HOME": "/root",
        }
        assert load_settings(pm, environ=env) == load_settings(pm, environ={})

    def test_plugin_manager_switches_fill_their_settings(self, pm: NxMeshPluginManager) -> None:
        """NXMESH_DISABLE_PLUGINS / _TRACE_HOOKS / _STRICT_PLUGINS show up in the settings."""
        env = {
            "NXMESH_DISABLE_PLUGINS": "a, b",
            "NXMESH_TRACE_HOOKS": "yes",
            "NXMESH_STRICT_PLUGINS": "0",
        }
        settings = load_settings(pm, environ=env)
        assert settings.disable_plugins == ("a", "b")
        assert settings.trace_hooks is True
        assert settings.strict_plugins is False


class TestValues:
    def test_bad_int_in_env_names_key_and_source(self, pm: NxMeshPluginManager) -> None:
        """A non-integer port names the setting, the variable and the reason."""
        with pytest.raises(ConfigurationError) as info:
            load_settings(pm, environ={"NXMESH_MASTER__API_PORT": "eighty"})
        assert str(info.value) == (
            "invalid value for setting 'master.api_port' from environment variable "
            "NXMESH_MASTER__API_PORT: expected an integer, got 'eighty'"
        )

    def test_bad_value_in_file_names_the_file(
        self, pm: NxMeshPluginManager, write_config: Any
    ) -> None:
        """A wrongly typed TOML value names the file; booleans are not integers."""
        path = write_config("[agent]\nmetrics_port = true\n")
        with pytest.raises(
            ConfigurationError, match=r"'agent.metrics_port' in .*nxmesh\.toml: expected an integer"
        ):
            load_settings(pm, path=path, environ={})

    def test_overridden_bad_file_value_is_still_reported(
        self, pm: NxMeshPluginManager, write_config: Any
    ) -> None:
        """Every source is validated, even a value a later source replaces."""
        path = write_config('[master]\napi_port = "x"\n')
        with pytest.raises(ConfigurationError, match=r"master\.api_port"):
            load_settings(pm, path=path, environ={"NXMESH_MASTER__API_PORT": "1"})

    def test_validators_run_with_source(self, pm: NxMeshPluginManager) -> None:
        """Class validators (port range) report through the same message shape."""
        with pytest.raises(
            ConfigurationError, match=r"'master\.grpc_port' from the command line: .*65535"
        ):
            load_settings(pm, environ={}, overrides={"master.grpc_port": 70000})

    @pytest.mark.parametrize(
        ("env", "attr", "expected"),
        [
            ({"NXMESH_MASTER__TRANSPORTS": "websocket, grpc"}, "transports", ("websocket", "grpc")),
            ({"NXMESH_AGENT__DRIFT_INTERVAL": "2.5"}, "drift_interval", 2.5),
            ({"NXMESH_AGENT__DRIFT_POLICY": "report"}, "drift_policy", "report"),
            (
                {"NXMESH_AGENT__LABELS": "env=prod, tier=web"},
                "labels",
                {"env": "prod", "tier": "web"},
            ),
            ({"NXMESH_AGENT__CONF_DIR": "/opt/nginx"}, "conf_dir", Path("/opt/nginx")),
        ],
    )
    def test_env_strings_are_converted(
        self, pm: NxMeshPluginManager, env: dict[str, str], attr: str, expected: object
    ) -> None:
        """Environment strings become tuples, floats, literals, mappings and paths."""
        settings = load_settings(pm, environ=env)
        section = settings.master if attr == "transports" else settings.agent
        assert getattr(section, attr) == expected

    @pytest.mark.parametrize(
        ("raw", "expected"), [("1", True), ("yes", True), ("TRUE", True), ("off", False)]
    )
    def test_booleans_accept_common_spellings(
        self, pm: NxMeshPluginManager, raw: str, expected: bool
    ) -> None:
        """1/0, true/false, yes/no and on/off all work, in any case."""
        settings = load_settings(pm, environ={"NXMESH_PLUGINS__HELLO__LOUD": raw})
        assert settings.plugin("hello", HelloSettings).loud is expected

    def test_bad_boolean_is_refused(self, pm: NxMeshPluginManager) -> None:
        """A word that is not a boolean is an error rather than False."""
        with pytest.raises(ConfigurationError, match="expected a boolean"):
            load_settings(pm, environ={"NXMESH_PLUGINS__HELLO__LOUD": "maybe"})

    def test_bad_literal_lists_the_choices(self, pm: NxMeshPluginManager) -> None:
        """A value outside a fixed set says which values are allowed."""
        with pytest.raises(ConfigurationError, match="expected one of 'auto', 'console', 'json'"):
            load_settings(pm, environ={"NXMESH_LOG_FORMAT": "xml"})

    def test_log_level_is_case_insensitive_and_checked(self, pm: NxMeshPluginManager) -> None:
        """DEBUG is accepted as debug; an unknown level is refused."""
        assert load_settings(pm, environ={"NXMESH_LOG_LEVEL": "DEBUG"}).log_level == "debug"
        with pytest.raises(ConfigurationError, match="'log_level' must be in"):
            load_settings(pm, environ={"NXMESH_LOG_LEVEL": "loud"})

    def test_empty_env_unsets_an_optional_path(self, pm: NxMeshPluginManager) -> None:
        """An empty variable sets an optional setting back to None."""
        settings = load_settings(
            pm,
            environ={"NXMESH_RENDERER__TEMPLATE_DIR": ""},
            overrides={"renderer.name": "custom"},
        )
        assert settings.renderer.template_dir is None
        assert settings.renderer.name == "custom"


class TestPluginSections:
    def test_section_read_from_file_and_env(
        self, pm: NxMeshPluginManager, write_config: Any
    ) -> None:
        """[plugins.hello] and NXMESH_PLUGINS__HELLO__* fill the plugin's own class."""
        path = write_config("[plugins.hello]\ngreeting = 'hi'\ntimes = 2\n")
        settings = load_settings(pm, path=path, environ={"NXMESH_PLUGINS__HELLO__TIMES": "3"})
        assert settings.plugin("hello", HelloSettings) == HelloSettings(greeting="hi", times=3)

    def test_plugin_validators_apply(self, pm: NxMeshPluginManager) -> None:
        """A plugin's own validator rejects a bad value, naming the plugin key."""
        with pytest.raises(ConfigurationError, match=r"'plugins\.hello\.times'"):
            load_settings(pm, environ={"NXMESH_PLUGINS__HELLO__TIMES": "0"})

    def test_checks_across_fields_see_all_final_values(self) -> None:
        """A min/max check sees both values together, and a violation names the section."""

        @attrs.frozen
        class Pool:
            low: int = 1
            high: int = 10

            def __attrs_post_init__(self) -> None:
                if self.low > self.high:
                    raise ValueError("low must not exceed high")

        class Plugin:
            @hookimpl
            def nxmesh_add_settings(self, registry: SettingsRegistry) -> None:
                registry.add_section("pool", Pool)

        pm = manager(("pool", Plugin()))
        env = {"NXMESH_PLUGINS__POOL__LOW": "50", "NXMESH_PLUGINS__POOL__HIGH": "60"}
        assert load_settings(pm, environ=env).plugin("pool", Pool) == Pool(50, 60)
        # Each value is fine on its own (5 <= default 10, default 1 <= 3), not together.
        with pytest.raises(ConfigurationError) as info:
            load_settings(
                pm, environ={"NXMESH_PLUGINS__POOL__LOW": "5", "NXMESH_PLUGINS__POOL__HIGH": "3"}
            )
        assert str(info.value) == (
            "invalid [plugins.pool] settings (from environment variable "
            "NXMESH_PLUGINS__POOL__HIGH; from environment variable NXMESH_PLUGINS__POOL__LOW): "
            "low must not exceed high"
        )

    def test_unknown_section_lookup_suggests(self, pm: NxMeshPluginManager) -> None:
        """settings.plugin() with a wrong name says which sections exist."""
        settings = load_settings(pm, environ={})
        with pytest.raises(ConfigurationError, match="did you mean 'hello'"):
            settings.plugin("helo")
        with pytest.raises(ConfigurationError, match="not a Settings"):
            settings.plugin("hello", Settings)

    def test_duplicate_section_names_both_plugins(self) -> None:
        """Two plugins declaring one section name is an error naming both."""
        pm = manager(("first", HelloPlugin()), ("second", HelloPlugin()))
        with pytest.raises(ConfigurationError) as info:
            load_settings(pm, environ={})
        message = str(info.value)
        assert "'hello' is declared twice" in message
        assert "plugin 'first'" in message
        assert "plugin 'second'" in message

    @pytest.mark.parametrize(
        ("cls", "reason"),
        [
            (attrs.make_class("NoDefault", {"x": attrs.field(type=int)}, frozen=True), "default"),
            (attrs.make_class("Mutable", {"x": attrs.field(type=int, default=1)}), "frozen"),
            (dict, "attrs class"),
        ],
    )
    def test_section_class_is_checked(self, cls: type, reason: str) -> None:
        """Sections must be frozen attrs classes whose fields all have defaults."""
        with pytest.raises(ConfigurationError, match=reason):
            SettingsRegistry().add_section("x", cls)

    def test_registry_can_be_filled_by_calling_the_hook(self) -> None:
        """Calling the hook directly with a registry works too (no plugin attribution)."""
        pm = manager(("hello", HelloPlugin()))
        registry = SettingsRegistry()
        pm.hook.nxmesh_add_settings(registry=registry)
        assert registry.sections()["hello"] is HelloSettings


class TestConfigureHook:
    def test_called_once_with_the_final_settings(self) -> None:
        """nxmesh_configure receives exactly the settings load_settings returns."""
        plugin = HelloPlugin()
        pm = manager(("hello", plugin))
        settings = load_settings(pm, environ={"NXMESH_WORKSPACE": "edge"})
        assert plugin.configured == [settings]
        assert plugin.configured[0] is settings

    def test_configure_can_refuse_to_start(self) -> None:
        """A ConfigurationError raised by a plugin's configure reaches the caller."""

        class Picky:
            @hookimpl
            def nxmesh_configure(self, settings: Settings) -> None:
                if settings.workspace == "default":
                    raise ConfigurationError("pick a workspace")

        with pytest.raises(ConfigurationError, match="pick a workspace"):
            load_settings(manager(("picky", Picky())), environ={})


class TestRedaction:
    def test_secrets_shown_as_stars_when_set(self, pm: NxMeshPluginManager) -> None:
        """master_key, secret-looking plugin fields and URL passwords are masked."""
        env = {
            "NXMESH_MASTER_KEY": "s3cr3t-key",
            "NXMESH_STORAGE_URL": "postgresql://nx:pa55word@db/nx",
            "NXMESH_PLUGINS__HELLO__WEBHOOK_TOKEN": "tok-123",
        }
        data = settings_as_dict(load_settings(pm, environ=env))
        assert data["master_key"] == "***"
        assert data["storage_url"] == "postgresql://nx:***@db/nx"
        assert data["plugins"]["hello"]["webhook_token"] == "***"
        assert data["plugins"]["hello"]["greeting"] == "hello"
        for secret in env.values():
            assert secret.split("@")[0] not in str(data)

    def test_secret_pairs_inside_urls_are_masked(self, pm: NxMeshPluginManager) -> None:
        """A password passed as a URL query parameter (SQLAlchemy hands it to the driver)
        is masked in `config show` and in repr, as in logs; other parameters stay."""
        url = "postgresql+psycopg://db.example/nx?password=hunter2&sslmode=require"
        settings = load_settings(pm, environ={"NXMESH_STORAGE_URL": url})
        shown = settings_as_dict(settings)["storage_url"]
        assert shown == "postgresql+psycopg://db.example/nx?password=***&sslmode=require"
        assert "hunter2" not in repr(settings)

    def test_unset_secrets_stay_empty(self, pm: NxMeshPluginManager) -> None:
        """An empty secret shows as empty, so 'not configured' stays visible."""
        assert settings_as_dict(load_settings(pm, environ={}))["master_key"] == ""

    def test_redact_false_shows_everything(self, pm: NxMeshPluginManager) -> None:
        """redact=False returns the real values, as plain data."""
        settings = load_settings(pm, environ={"NXMESH_MASTER_KEY": "s3cr3t"})
        data = settings_as_dict(settings, redact=False)
        assert data["master_key"] == "s3cr3t"
        assert data["state_dir"] == ".nxmesh"
        assert data["master"]["transports"] == ["grpc", "websocket"]

    def test_secret_metadata_marks_any_field(self) -> None:
        """A field marked with SECRET_METADATA is masked whatever its name."""
        cls = attrs.make_class(
            "Dsn",
            {"dsn": attrs.field(type=str, default="x", metadata=SECRET_METADATA)},
            frozen=True,
        )
        data = settings_as_dict(Settings(plugins={"db": cls()}))
        assert data["plugins"]["db"]["dsn"] == "***"

    def test_repr_hides_secrets(self) -> None:
        """repr(settings) (tracebacks, debug logs) never contains a secret."""
        text = repr(Settings(master_key="s3cr3t", storage_url="postgresql://u:pa55@db/x"))
        assert "s3cr3t" not in text
        assert "pa55" not in text
        assert "postgresql://u:***@db/x" in text

    def test_bad_secret_value_is_not_echoed(self) -> None:
        """The error for an invalid secret does not print the secret."""

        @attrs.frozen
        class Creds:
            api_key: str = attrs.field(
                default="", validator=attrs.validators.matches_re("[a-z]{4}")
            )

        class Plugin:
            @hookimpl
            def nxmesh_add_settings(self, registry: SettingsRegistry) -> None:
                registry.add_section("creds", Creds)

        with pytest.raises(ConfigurationError) as info:
            load_settings(
                manager(("creds", Plugin())), environ={"NXMESH_PLUGINS__CREDS__API_KEY": "abcdefgh"}
            )
        assert "plugins.creds.api_key" in str(info.value)
        assert "abcdefgh" not in str(info.value)


class TestPluginManagerOptions:
    def test_reads_plugin_switches_from_the_file(self, write_config: Any) -> None:
        """disable_plugins, strict_plugins and trace_hooks come back as manager kwargs."""
        path = write_config('disable_plugins = ["hello"]\ntrace_hooks = true\n')
        options = plugin_manager_options(path=path, environ={})
        assert options == {"disabled": ("hello",), "trace": True}
        pm = get_plugin_manager(
            autoload=False, plugins=[("hello", HelloPlugin())], environ={}, **options
        )
        assert pm.is_blocked("hello")

    def test_no_file_no_options(self) -> None:
        """Without a config file the manager keeps its own defaults."""
        assert plugin_manager_options(environ={}) == {}
