"""Settings: frozen attrs classes filled from defaults, ``nxmesh.toml``, ``NXMESH_*`` and flags.

Precedence, lowest first: class defaults → the TOML file → environment variables →
overrides (command-line flags). Every source is checked against the same schema, so a
typo is an error with a suggestion wherever it is made, and a bad value names the key,
the source and the reason.

Plugins declare their own section with `nxmesh_add_settings`; it is read from the
``[plugins.<name>]`` table and from ``NXMESH_PLUGINS__<NAME>__<FIELD>`` and reaches the
plugin as ``settings.plugin("<name>")``.

Environment variables map onto the schema by upper-casing and joining nested names with a
double underscore: ``log_level`` → ``NXMESH_LOG_LEVEL``, ``master.api_port`` →
``NXMESH_MASTER__API_PORT``. Tuples are comma-separated (``grpc,websocket``), mappings are
``key=value`` pairs (``env=prod,tier=web``), booleans are ``1/0/true/false/yes/no/on/off``.
"""

from __future__ import annotations

import os
import re
import tomllib
import types
import typing
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, TypeVar, overload

import attrs
import cattrs
import pluggy

from nxmesh.core.errors import ConfigurationError
from nxmesh.core.hints import closest
from nxmesh.core.logging import (
    LOG_FORMATS,
    LOG_LEVELS,
    REDACTED,
    is_secret_key,
    redact_text,
)
from nxmesh.core.validation import size_reason

__all__ = [
    "DEFAULT_CONFIG_FILE",
    "ENV_CONFIG",
    "ENV_PREFIX",
    "NON_SETTINGS_ENV",
    "NON_SETTINGS_ENV_PREFIXES",
    "SECRET_METADATA",
    "AgentSettings",
    "AuthSettings",
    "MasterSettings",
    "RendererSettings",
    "Settings",
    "SettingsRegistry",
    "load_settings",
    "plugin_manager_options",
    "settings_as_dict",
]

T = TypeVar("T")

ENV_PREFIX = "NXMESH_"
ENV_CONFIG = "NXMESH_CONFIG"
DEFAULT_CONFIG_FILE = Path("nxmesh.toml")

NON_SETTINGS_ENV = frozenset(
    {
        ENV_CONFIG,
        "NXMESH_DISABLE_PLUGIN_AUTOLOAD",
    }
)
"""``NXMESH_*`` variables that are not settings and so are not rejected as unknown.

``NXMESH_DISABLE_PLUGINS``, ``NXMESH_STRICT_PLUGINS`` and ``NXMESH_TRACE_HOOKS`` are read
by `nxmesh.core.pluginmanager.get_plugin_manager` *and* fill the settings of the same name,
so ``nxmesh config show`` tells the truth about them.
"""
NON_SETTINGS_ENV_PREFIXES = ("NXMESH_TEST_",)
"""Prefixes of ``NXMESH_*`` variables reserved for other uses (the test suite)."""

SECRET_METADATA: Mapping[str, bool] = types.MappingProxyType({"nxmesh.secret": True})
"""Field metadata marking a secret: ``attrs.field(default="", repr=False,
metadata=SECRET_METADATA)``. Names that look secret (``password``, ``api_key``...) are
redacted even without it."""

_SECTION_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_-]{0,62}$")
_WORKSPACE = re.compile(r"^[a-z0-9][a-z0-9_-]{0,62}$")
_TRUE = frozenset({"1", "true", "yes", "on"})
_FALSE = frozenset({"0", "false", "no", "off"})


# ---------------------------------------------------------------------------------------
# Validators and converters for the core sections
# ---------------------------------------------------------------------------------------


def _port(_inst: object, attribute: attrs.Attribute[int], value: int) -> None:
    # 0 asks the OS for a free port: what tests and throwaway demos want.
    if not 0 <= value <= 65535:
        raise ValueError(f"{attribute.name} must be between 0 and 65535, got {value}")


def _positive(_inst: object, attribute: attrs.Attribute[float], value: float) -> None:
    if not value > 0:
        raise ValueError(f"{attribute.name} must be greater than 0, got {value}")


def _not_negative(_inst: object, attribute: attrs.Attribute[int], value: int) -> None:
    if value < 0:
        raise ValueError(f"{attribute.name} must be 0 or more, got {value}")


def _days(_inst: object, attribute: attrs.Attribute[float], value: float) -> None:
    if not (value >= 0 and value != float("inf")):
        raise ValueError(
            f"{attribute.name} must be a number of days, 0 or more (0 keeps forever), got {value}"
        )


def _versions_kept(_inst: object, attribute: attrs.Attribute[int], value: int) -> None:
    if value < 0:
        raise ValueError(
            f"{attribute.name} must be a number of versions, 0 or more (0 keeps every "
            f"status), got {value}"
        )


def _names(_inst: object, attribute: attrs.Attribute[tuple[str, ...]], value: Any) -> None:
    if not all(isinstance(v, str) and v for v in value):
        raise ValueError(f"{attribute.name} must hold non-empty names, got {value!r}")


def _url(_inst: object, attribute: attrs.Attribute[str], value: str) -> None:
    if value and "://" not in value:
        raise ValueError(f"{attribute.name} must be a URL such as 'scheme://host', got {value!r}")


def _urls(_inst: object, attribute: attrs.Attribute[tuple[str, ...]], value: Any) -> None:
    for item in value:
        if not isinstance(item, str) or "://" not in item:
            raise ValueError(
                f"{attribute.name} must hold URLs such as 'scheme://host', got {item!r}"
            )


def _cert_and_key(inst: Any, attribute: attrs.Attribute[Path | None], value: Path | None) -> None:
    if (inst.api_cert_file is None) != (value is None):
        raise ValueError("master.api_cert_file and master.api_key_file go together: set both")


def _path(_inst: object, attribute: attrs.Attribute[str], value: str) -> None:
    if not value.startswith("/") or any(c in value for c in " ?#"):
        raise ValueError(f"{attribute.name} must be a URL path such as '/agent', got {value!r}")


def _absolute_file(_inst: object, attribute: attrs.Attribute[Any], value: Path | None) -> None:
    # nginx resolves a relative path against its configuration prefix, not the agent's
    # working directory; '$' would read as an nginx variable.
    if value is not None and (
        not value.is_absolute() or not str(value).isprintable() or "$" in str(value)
    ):
        raise ValueError(f"{attribute.name} must be an absolute file path, got {str(value)!r}")


def _cache_size(_inst: object, attribute: attrs.Attribute[str], value: str) -> None:
    if value and (reason := size_reason(value)) is not None:
        raise ValueError(f"{attribute.name} {reason}")


def _workspace(_inst: object, attribute: attrs.Attribute[str], value: str) -> None:
    if not _WORKSPACE.fullmatch(value):
        raise ValueError(
            f"{attribute.name} must be 1-63 lowercase letters, digits, '-' or '_', got {value!r}"
        )


def _lower(value: str) -> str:
    return value.lower()


def _freeze_labels(value: Mapping[str, str]) -> Mapping[str, str]:
    return types.MappingProxyType(dict(value))


def _freeze_sections(value: Mapping[str, object]) -> Mapping[str, object]:
    return types.MappingProxyType(dict(value))


def _labels(_inst: object, attribute: attrs.Attribute[Any], value: Mapping[str, str]) -> None:
    for key, val in value.items():
        if not isinstance(key, str) or not key or not isinstance(val, str):
            raise ValueError(f"{attribute.name} must map non-empty names to strings")


def _url_repr(value: str) -> str:
    return repr(redact_text(value))


# ---------------------------------------------------------------------------------------
# The core sections
# ---------------------------------------------------------------------------------------


@attrs.frozen
class MasterSettings:
    """``[master]``: where the master listens and which transports it serves.

    The API serves HTTPS when `api_tls` is on (see `nxmesh.transports.api_tls_files`).
    The WebSocket transport is mounted on the API's own listener at `websocket_path`
    (same address, same TLS as the API); the gRPC transport listens on `grpc_port` (same
    host as the API) with TLS from the master's own CA unless its plugin section says
    ``tls = false``. `heartbeat_interval` is what agents are told to use.
    `compress_versions` sends versions zlib-compressed to the agents that read them (all
    of this release's); off, every frame's body is plain JSON, e.g. to read captures.
    `tls_read_buffer_bytes` caps asyncio's TLS read buffer (256 KiB per connection) when
    the API serves HTTPS: agents on the WebSocket mount then cost ~60 KB each, not ~310
    (0 keeps asyncio's; see `nxmesh.tls.limit_tls_read_buffer`).
    `gc_threshold` is the garbage collector's young-generation threshold for the master
    process (0 keeps Python's 700; see `nxmesh.master.server.tune_gc`).

    Retention (`nxmesh.master.retention`, every `retention_interval` seconds, one master
    at a time): audit entries older than `audit_retention_days`; rollout statuses beyond
    each workspace's latest `status_retention_versions` versions (each agent's latest
    status, the one of the version it runs and those of pinned versions always stay);
    bootstrap tokens, refresh tokens and API tokens `token_retention_days` after they
    were used or expired. 0 keeps that kind forever. `retention_batch_size` rows go per
    delete statement (one short transaction each).
    """

    api_host: str = "127.0.0.1"
    api_port: int = attrs.field(default=8470, validator=_port)
    # HTTPS for the API and the agent WebSocket on it: the certificate the gRPC listener
    # serves (the master's own CA, `<state_dir>/tls`, what agents pin), or
    # `api_cert_file` + `api_key_file` (PEM, e.g. from a public CA).
    api_tls: bool = False
    api_cert_file: Path | None = None
    api_key_file: Path | None = attrs.field(default=None, validator=_cert_and_key)
    grpc_port: int = attrs.field(default=8471, validator=_port)
    transports: tuple[str, ...] = attrs.field(default=("grpc", "websocket"), validator=_names)
    websocket_path: str = attrs.field(default="/agent", validator=_path)
    heartbeat_interval: float = attrs.field(default=30.0, validator=_positive)
    compress_versions: bool = True
    tls_read_buffer_bytes: int = attrs.field(default=4 * 1024, validator=_not_negative)
    gc_threshold: int = attrs.field(default=50_000, validator=_not_negative)
    retention_interval: float = attrs.field(default=3600.0, validator=_positive)
    audit_retention_days: float = attrs.field(default=365.0, validator=_days)
    status_retention_versions: int = attrs.field(default=20, validator=_versions_kept)
    token_retention_days: float = attrs.field(default=7.0, validator=_days)
    retention_batch_size: int = attrs.field(
        default=1000, validator=[attrs.validators.ge(1), attrs.validators.le(100_000)]
    )


@attrs.frozen
class AgentSettings:
    """``[agent]``: how the agent reaches its master and drives its nginx.

    `master_url` names the master; the agent tries one endpoint per transport in
    `transports` order, derived from it (see ``docs/agent.md``), unless `endpoints`
    lists the URLs explicitly. `ca_file` pins the master's CA for ``grpcs://`` and
    ``wss://``. `bootstrap_token` (or the file `bootstrap_token_file`) enrolls the agent
    once; the credentials it gets are kept in the state directory and reused.
    `listen_address` binds the sites' listeners that name no address to this host's
    address (several agents on one host, multi-homed hosts). `upstream_ca_file` is the
    trust store TLS upstreams without their own ``ca`` are verified against.
    `proxy_cache_size` bounds the disk the caching locations' answers take.
    `listen_ipv6`: whether the listeners that name no address also listen on IPv6
    (``[::]``); ``auto`` when this host has IPv6, as nginx's own container image does.
    """

    # The master's API as `nxmesh master` serves it by default (plain HTTP on 8470): the
    # WebSocket endpoint is derived from it (ws://…/agent), gRPC from its host (:8471).
    master_url: str = attrs.field(default="http://127.0.0.1:8470", validator=_url)
    transports: tuple[str, ...] = attrs.field(default=("grpc", "websocket"), validator=_names)
    endpoints: tuple[str, ...] = attrs.field(default=(), validator=_urls)
    ca_file: Path | None = None
    bootstrap_token: str = attrs.field(default="", repr=False, metadata=SECRET_METADATA)
    bootstrap_token_file: Path | None = None
    name: str = ""
    listen_address: str = ""
    # "auto": the sites' address-less listeners also take IPv6 when this host has it.
    listen_ipv6: Literal["auto", "on", "off"] = attrs.field(
        default="auto", validator=attrs.validators.in_(("auto", "on", "off"))
    )
    deployment_mode: str = "auto"
    nginx_driver: str = "reload"
    nginx_binary: str = "nginx"
    conf_dir: Path = Path("/etc/nginx")
    metrics_host: str = "127.0.0.1"
    metrics_port: int = attrs.field(default=9470, validator=_port)
    drift_interval: float = attrs.field(default=30.0, validator=_positive)
    drift_policy: Literal["revert", "report"] = attrs.field(
        default="revert", validator=attrs.validators.in_(("revert", "report"))
    )
    health_interval: float = attrs.field(default=15.0, validator=_positive)
    # None: the renderer's default, the Debian/Alpine trust store.
    upstream_ca_file: Path | None = attrs.field(default=None, validator=_absolute_file)
    # "": the renderer's default (1g). nginx's size syntax: digits and k, m or g.
    proxy_cache_size: str = attrs.field(default="", validator=_cache_size)
    # Mappings are frozen too and kept out of the hash: a dict would make the
    # "frozen" settings mutable through the back door.
    labels: Mapping[str, str] = attrs.field(
        factory=dict, converter=_freeze_labels, validator=_labels, hash=False
    )


@attrs.frozen
class RendererSettings:
    """``[renderer]``: which renderer turns desired state into nginx files."""

    name: str = "nginx"
    template_dir: Path | None = None


def _freeze_roles(value: Mapping[str, Sequence[str]]) -> Mapping[str, tuple[str, ...]]:
    return types.MappingProxyType({name: tuple(perms) for name, perms in value.items()})


@attrs.frozen
class AuthSettings:
    """``[auth]``: how the master API authenticates callers and what custom roles grant.

    `roles` maps a custom role name to its permissions (``resource:action`` patterns,
    optionally ``@workspace``); see ``docs/api.md``. Argon2id costs default to RFC 9106's
    low-memory profile; lower them only where hashing time matters more (tests).
    `argon2_concurrency` caps the hashes computed at once (each holds
    `argon2_memory_kib`). `lockout_threshold` counts failures per user and address,
    `lockout_address_threshold` per address over all usernames (password spraying).
    """

    chain: tuple[str, ...] = attrs.field(default=("jwt", "api_token", "password"), validator=_names)
    issuer: str = "nxmesh"
    audience: str = "nxmesh-api"
    access_token_ttl: float = attrs.field(default=900.0, validator=_positive)
    refresh_token_ttl: float = attrs.field(default=14 * 86400.0, validator=_positive)
    lockout_threshold: int = attrs.field(default=5, validator=attrs.validators.ge(1))
    lockout_address_threshold: int = attrs.field(default=20, validator=attrs.validators.ge(1))
    lockout_base_delay: float = attrs.field(default=1.0, validator=_positive)
    lockout_max_delay: float = attrs.field(default=900.0, validator=_positive)
    argon2_time_cost: int = attrs.field(default=3, validator=attrs.validators.ge(1))
    argon2_memory_kib: int = attrs.field(default=65536, validator=attrs.validators.ge(8))
    argon2_parallelism: int = attrs.field(default=4, validator=attrs.validators.ge(1))
    argon2_concurrency: int = attrs.field(default=4, validator=attrs.validators.ge(1))
    public_metrics: bool = False
    roles: Mapping[str, tuple[str, ...]] = attrs.field(
        factory=dict, converter=_freeze_roles, hash=False
    )


@attrs.frozen
class Settings:
    """Everything an NxMesh application is configured with; immutable once loaded."""

    state_dir: Path = Path(".nxmesh")
    workspace: str = attrs.field(default="default", validator=_workspace)
    storage_url: str = attrs.field(default="", validator=_url, repr=_url_repr)
    event_bus_url: str = attrs.field(default="memory://", validator=_url, repr=_url_repr)
    disable_plugins: tuple[str, ...] = attrs.field(default=(), validator=_names)
    strict_plugins: bool = False
    trace_hooks: bool = False
    log_level: str = attrs.field(
        default="info", converter=_lower, validator=attrs.validators.in_(tuple(LOG_LEVELS))
    )
    log_format: Literal["auto", "console", "json"] = attrs.field(
        default="auto", validator=attrs.validators.in_(LOG_FORMATS)
    )
    master_key: str = attrs.field(default="", repr=False, metadata=SECRET_METADATA)
    # Master key rotation (docs/secrets.md): earlier master keys, still read, never used to
    # encrypt; as base64url values and as key files (32 raw bytes or base64url text).
    previous_master_keys: tuple[str, ...] = attrs.field(
        default=(), repr=False, metadata=SECRET_METADATA
    )
    previous_master_key_files: tuple[Path, ...] = ()
    master: MasterSettings = attrs.field(factory=MasterSettings)
    agent: AgentSettings = attrs.field(factory=AgentSettings)
    renderer: RendererSettings = attrs.field(factory=RendererSettings)
    auth: AuthSettings = attrs.field(factory=AuthSettings)
    plugins: Mapping[str, object] = attrs.field(
        factory=dict, converter=_freeze_sections, hash=False
    )

    def effective_storage_url(self) -> str:
        """`storage_url`, or a SQLite database in `state_dir` when it is empty."""
        if self.storage_url:
            return self.storage_url
        return f"sqlite:///{self.state_dir / 'master.db'}"

    @overload
    def plugin(self, name: str) -> Any: ...
    @overload
    def plugin(self, name: str, cls: type[T]) -> T: ...

    def plugin(self, name: str, cls: type[Any] | None = None) -> Any:
        """The settings section plugin `name` declared; pass `cls` to get it typed."""
        try:
            section = self.plugins[name]
        except KeyError:
            raise ConfigurationError(
                f"no settings section {name!r}{_did_you_mean(name, self.plugins)} "
                f"(declared: {', '.join(sorted(self.plugins)) or 'none'})"
            ) from None
        if cls is not None and not isinstance(section, cls):
            raise ConfigurationError(
                f"settings section {name!r} is a {type(section).__qualname__}, "
                f"not a {cls.__qualname__}"
            )
        return section


_CORE_SECTIONS: dict[str, type[Any]] = {
    "master": MasterSettings,
    "agent": AgentSettings,
    "renderer": RendererSettings,
    "auth": AuthSettings,
}


# ---------------------------------------------------------------------------------------
# Plugin sections
# ---------------------------------------------------------------------------------------


@attrs.frozen
class _Section:
    name: str
    cls: type[Any]
    plugin: str | None


class SettingsRegistry:
    """The settings sections plugins declare through `nxmesh_add_settings`."""

    def __init__(self) -> None:
        self._sections: dict[str, _Section] = {}
        self._current_plugin: str | None = None

    def add_section(self, name: str, cls: type[Any]) -> None:
        """Declare section `name`, read from ``[plugins.<name>]`` into a `cls` instance.

        `cls` must be a frozen attrs class whose fields all have defaults, so a plugin
        works unconfigured. Two sections with one name are an error naming both.
        """
        plugin = self._current_plugin
        if not _SECTION_NAME.fullmatch(name):
            raise ConfigurationError(
                f"settings section name {name!r}{_by(plugin)} must start with a letter and "
                "hold only letters, digits, '-' and '_'"
            )
        _check_section_class(name, cls, plugin)
        key = _env_name(name)
        for existing in self._sections.values():
            if _env_name(existing.name) == key:
                raise ConfigurationError(
                    f"settings section {name!r} is declared twice: "
                    f"{_describe(existing)} and {_describe(_Section(name, cls, plugin))}"
                )
        self._sections[name] = _Section(name, cls, plugin)

    def sections(self) -> dict[str, type[Any]]:
        """Section name → settings class, in declaration order."""
        return {name: s.cls for name, s in self._sections.items()}

    def __contains__(self, name: object) -> bool:
        return name in self._sections

    def __len__(self) -> int:
        return len(self._sections)

    def __iter__(self) -> Iterator[str]:
        return iter(self._sections)

    @classmethod
    def collect(cls, pm: pluggy.PluginManager) -> SettingsRegistry:
        """Ask every plugin for its sections, remembering which plugin declared which.

        Equivalent to ``pm.hook.nxmesh_add_settings(registry=registry)`` except that
        hook wrappers are not run: implementations are called one at a time (like
        `ProviderRegistries.collect`) so a duplicate section can name both plugins.
        """
        registry = cls()
        kwargs = {"registry": registry}
        for impl in pm.hook.nxmesh_add_settings.get_hookimpls():
            if impl.hookwrapper or impl.wrapper:
                continue
            registry._current_plugin = impl.plugin_name
            try:
                impl.function(*(kwargs[arg] for arg in impl.argnames))
            finally:
                registry._current_plugin = None
        return registry


def _check_section_class(name: str, cls: type[Any], plugin: str | None) -> None:
    where = f"settings section {name!r}{_by(plugin)}"
    if not (isinstance(cls, type) and attrs.has(cls)):
        raise ConfigurationError(f"{where} must be an attrs class, got {cls!r}")
    # `attrs.inspect` appeared in attrs 25.4; older versions skip the frozen check.
    inspect = getattr(attrs, "inspect", None)
    if inspect is not None and not inspect(cls).is_frozen:
        raise ConfigurationError(f"{where}: {cls.__qualname__} must be frozen (@attrs.frozen)")
    missing = [a.name for a in attrs.fields(cls) if a.init and a.default is attrs.NOTHING]
    if missing:
        raise ConfigurationError(
            f"{where}: every field of {cls.__qualname__} needs a default "
            f"(missing: {', '.join(missing)})"
        )


def _by(plugin: str | None) -> str:
    return f" from plugin {plugin!r}" if plugin else ""


def _describe(section: _Section) -> str:
    return f"{section.cls.__module__}.{section.cls.__qualname__}{_by(section.plugin)}"


# ---------------------------------------------------------------------------------------
# Coercion: a private converter, lenient with strings (env, flags), strict with types
# ---------------------------------------------------------------------------------------


def _to_str(value: Any, _t: type) -> str:
    if not isinstance(value, str):
        raise TypeError(f"expected a string, got {value!r}")
    return value


def _to_bool(value: Any, _t: type) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in _TRUE | _FALSE:
        return value.strip().lower() in _TRUE
    raise ValueError(f"expected a boolean (true/false, yes/no, 1/0), got {value!r}")


def _to_int(value: Any, _t: type) -> int:
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, str):
        try:
            return int(value.strip())
        except ValueError:
            pass
    raise ValueError(f"expected an integer, got {value!r}")


def _to_float(value: Any, _t: type) -> float:
    if isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, str):
        try:
            return float(value.strip())
        except ValueError:
            pass
    raise ValueError(f"expected a number, got {value!r}")


def _to_path(value: Any, _t: type) -> Path:
    if isinstance(value, Path):
        return value
    if isinstance(value, str) and value:
        return Path(value).expanduser()
    raise ValueError(f"expected a path, got {value!r}")


def _split_list(value: str) -> list[str]:
    return [item.strip() for item in value.split(",") if item.strip()]


def _origin(t: Any) -> Any:
    return typing.get_origin(t)


def _is_sequence(t: Any) -> bool:
    return _origin(t) in (tuple, list, Sequence)


def _is_mapping(t: Any) -> bool:
    return _origin(t) in (dict, Mapping)


def _is_literal(t: Any) -> bool:
    return _origin(t) is Literal


def _is_union(t: Any) -> bool:
    return _origin(t) in (typing.Union, types.UnionType)


def _make_converter() -> cattrs.Converter:
    conv = cattrs.Converter()
    conv.register_structure_hook(str, _to_str)
    conv.register_structure_hook(bool, _to_bool)
    conv.register_structure_hook(int, _to_int)
    conv.register_structure_hook(float, _to_float)
    conv.register_structure_hook(Path, _to_path)

    def sequence_hook(t: Any) -> Callable[[Any, Any], Any]:
        args = typing.get_args(t)
        # tuple[str, int] has one type per position; tuple[str, ...], list[str] one for all.
        fixed = _origin(t) is tuple and args and not (len(args) == 2 and args[1] is Ellipsis)

        def hook(value: Any, _t: Any) -> Any:
            items = _split_list(value) if isinstance(value, str) else value
            if not isinstance(items, list | tuple):
                raise TypeError(f"expected a list, got {value!r}")
            if fixed:
                if len(items) != len(args):
                    raise ValueError(f"expected {len(args)} items, got {len(items)}")
                return tuple(conv.structure(v, a) for v, a in zip(items, args, strict=True))
            item_type = args[0] if args else Any
            out = [conv.structure(v, item_type) for v in items]
            return out if _origin(t) is list else tuple(out)

        return hook

    def mapping_hook(t: Any) -> Callable[[Any, Any], Any]:
        args = typing.get_args(t)
        key_t, val_t = args if len(args) == 2 else (Any, Any)

        def hook(value: Any, _t: Any) -> dict[Any, Any]:
            if isinstance(value, str):
                pairs = [p.partition("=") for p in _split_list(value)]
                if any(not sep or not k.strip() for k, sep, _ in pairs):
                    raise ValueError(f"expected key=value pairs separated by commas, got {value!r}")
                value = {k.strip(): v.strip() for k, _, v in pairs}
            if not isinstance(value, Mapping):
                raise TypeError(f"expected a table of key = value, got {value!r}")
            return {conv.structure(k, key_t): conv.structure(v, val_t) for k, v in value.items()}

        return hook

    def literal_hook(t: Any) -> Callable[[Any, Any], Any]:
        allowed = typing.get_args(t)

        def hook(value: Any, _t: Any) -> Any:
            if value in allowed:
                return value
            raise ValueError(f"expected one of {', '.join(map(repr, allowed))}, got {value!r}")

        return hook

    def union_hook(t: Any) -> Callable[[Any, Any], Any]:
        members = [m for m in typing.get_args(t) if m is not type(None)]
        optional = len(members) < len(typing.get_args(t))

        def hook(value: Any, _t: Any) -> Any:
            # An empty environment variable is how a user unsets an optional setting.
            if optional and (value is None or value == ""):
                return None
            errors: list[str] = []
            for member in members:
                try:
                    return conv.structure(value, member)
                except (ValueError, TypeError, cattrs.BaseValidationError) as exc:
                    errors.append(_reason(exc))
            raise ValueError("; ".join(errors))

        return hook

    conv.register_structure_hook_factory(_is_sequence, sequence_hook)
    conv.register_structure_hook_factory(_is_mapping, mapping_hook)
    conv.register_structure_hook_factory(_is_literal, literal_hook)
    conv.register_structure_hook_factory(_is_union, union_hook)
    return conv


_converter = _make_converter()


def _reason(exc: BaseException) -> str:
    if isinstance(exc, cattrs.BaseValidationError):
        return "; ".join(cattrs.transform_error(exc))
    # attrs' own validators raise ValueError(message, attribute, expected, value).
    if len(exc.args) > 1 and isinstance(exc.args[0], str):
        return exc.args[0]
    return str(exc)


# ---------------------------------------------------------------------------------------
# The schema every source is checked against
# ---------------------------------------------------------------------------------------

_Path = tuple[str, ...]


@attrs.frozen
class _Leaf:
    path: _Path
    owner: type[Any]
    alias: str  # the key users write and ``__init__`` takes
    attr: str  # the attribute it lands in (differs for private fields)
    type: Any

    @property
    def dotted(self) -> str:
        return ".".join(self.path)

    @property
    def env(self) -> str:
        return ENV_PREFIX + "__".join(_env_name(p) for p in self.path)


def _env_name(name: str) -> str:
    return name.upper().replace("-", "_")


@attrs.define
class _Schema:
    leaves: dict[_Path, _Leaf] = attrs.Factory(dict)
    tables: dict[_Path, list[str]] = attrs.Factory(dict)
    owners: dict[_Path, type[Any]] = attrs.Factory(dict)
    env: dict[str, _Leaf] = attrs.Factory(dict)

    @classmethod
    def build(cls, sections: Mapping[str, type[Any]]) -> _Schema:
        schema = cls()
        top = [_alias(f) for f in _fields(Settings) if f.name not in (*_CORE_SECTIONS, "plugins")]
        schema._add_table((), Settings, top)
        schema.tables[()] = [*top, *_CORE_SECTIONS, "plugins"]
        for name, section_cls in _CORE_SECTIONS.items():
            schema._add_table((name,), section_cls)
        schema.tables[("plugins",)] = list(sections)
        for name, section_cls in sections.items():
            schema._add_table(("plugins", name), section_cls)
        return schema

    def _add_table(self, path: _Path, owner: type[Any], only: list[str] | None = None) -> None:
        names = []
        for f in _fields(owner):
            if only is not None and _alias(f) not in only:
                continue
            leaf = _Leaf((*path, _alias(f)), owner, _alias(f), f.name, f.type)
            self.leaves[leaf.path] = leaf
            self.env[leaf.env] = leaf
            names.append(_alias(f))
        self.tables[path] = names
        self.owners[path] = owner


def _alias(field: attrs.Attribute[Any]) -> str:
    """The keyword ``__init__`` takes: the field name without a leading underscore."""
    return field.alias or field.name


def _fields(cls: type[Any]) -> list[attrs.Attribute[Any]]:
    try:
        attrs.resolve_types(cls)
    except NameError as exc:
        raise ConfigurationError(
            f"cannot resolve the field types of settings class {cls.__qualname__}: {exc}"
        ) from exc
    return [f for f in attrs.fields(cls) if f.init]


def _did_you_mean(name: str, candidates: Iterator[str] | Sequence[str] | Mapping[str, Any]) -> str:
    hint = closest(name, candidates)
    return f"; did you mean {hint!r}?" if hint else ""


# ---------------------------------------------------------------------------------------
# Reading each source into {path: (value, origin)}
# ---------------------------------------------------------------------------------------

_Layer = dict[_Path, tuple[Any, str]]


def _walk(
    data: Mapping[str, Any],
    prefix: _Path,
    origin: str,
    schema: _Schema,
    blocked: Callable[[str], bool],
    out: _Layer,
    problems: list[str],
) -> None:
    """Put the leaves of `data` into `out`; what is not a setting goes to `problems`."""
    for raw_key, value in data.items():
        key = str(raw_key)
        path = (*prefix, key)
        if path in schema.tables:
            if not isinstance(value, Mapping):
                problems.append(
                    f"invalid value for setting {'.'.join(path)!r} {origin}: "
                    f"expected a table, got {value!r}"
                )
                continue
            _walk(value, path, origin, schema, blocked, out, problems)
        elif path in schema.leaves:
            out[path] = (value, origin)
        elif prefix == ("plugins",) and blocked(key):
            continue  # a disabled plugin keeps its configuration for when it returns
        else:
            what = "plugin section" if prefix == ("plugins",) else "setting"
            problems.append(
                f"unknown {what} {'.'.join(path)!r} {origin}"
                f"{_did_you_mean(key, schema.tables.get(prefix, []))}"
            )


class _SettingsProblems(ConfigurationError):
    """A `ConfigurationError` that keeps the problems it lists, to be gathered with
    others (`load_settings` builds every table before it reports)."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = problems
        if len(problems) == 1:
            super().__init__(problems[0])
        else:
            listed = "\n".join(f"  - {p}" for p in problems)
            super().__init__(f"{len(problems)} problems in the settings:\n{listed}")


def _raise_problems(problems: list[str]) -> None:
    """One `ConfigurationError` naming every problem found (a file with three mistakes
    is fixed in one round, not three)."""
    if problems:
        raise _SettingsProblems(problems)


def _read_file(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as fh:
            return tomllib.load(fh)
    except FileNotFoundError:
        raise ConfigurationError(f"config file not found: {path}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigurationError(f"cannot parse config file {path}: {exc}") from exc
    except OSError as exc:
        raise ConfigurationError(f"cannot read config file {path}: {exc}") from exc


def _config_path(path: Path | None, environ: Mapping[str, str]) -> Path | None:
    if path is not None:
        return path
    if environ.get(ENV_CONFIG):
        return Path(environ[ENV_CONFIG]).expanduser()
    return DEFAULT_CONFIG_FILE if DEFAULT_CONFIG_FILE.is_file() else None


def _is_reserved_env(name: str) -> bool:
    return name in NON_SETTINGS_ENV or name.startswith(NON_SETTINGS_ENV_PREFIXES)


def _env_layer(
    environ: Mapping[str, str],
    schema: _Schema,
    blocked: Callable[[str], bool],
    problems: list[str],
) -> _Layer:
    out: _Layer = {}
    for var, raw in environ.items():
        name = var.upper()
        if not name.startswith(ENV_PREFIX) or _is_reserved_env(name):
            continue
        leaf = schema.env.get(name)
        if leaf is None:
            parts = name[len(ENV_PREFIX) :].split("__")
            if len(parts) > 1 and parts[0] == "PLUGINS" and blocked(parts[1].lower()):
                continue
            problems.append(
                f"unknown setting in environment variable {var}{_did_you_mean(name, schema.env)}"
            )
            continue
        out[leaf.path] = (raw, f"from environment variable {var}")
    return out


def _overrides_layer(
    overrides: Mapping[str, object],
    schema: _Schema,
    blocked: Callable[[str], bool],
    problems: list[str],
) -> _Layer:
    nested: dict[str, Any] = {}
    for key, value in overrides.items():
        if value is None:  # an unset command-line flag
            continue
        *parents, last = key.split(".")
        table = nested
        for part in parents:
            table = table.setdefault(part, {})
        table[last] = value
    out: _Layer = {}
    _walk(nested, (), "from the command line", schema, blocked, out, problems)
    return out


def _convert(leaf: _Leaf, value: Any, origin: str) -> Any:
    """`value` converted to the field's type; a wrong type names the key and the source."""
    try:
        return _converter.structure(value, leaf.type)
    except (ValueError, TypeError, cattrs.BaseValidationError) as exc:
        raise _value_error(leaf, value, origin, exc) from None


def _value_error(leaf: _Leaf, value: Any, origin: str, exc: BaseException) -> ConfigurationError:
    reason = _reason(exc)
    if is_secret_key(leaf.alias) and isinstance(value, str) and value:
        reason = reason.replace(value, REDACTED)  # a bad secret is still a secret
    return ConfigurationError(f"invalid value for setting {leaf.dotted!r} {origin}: {reason}")


_Merged = dict[_Path, tuple[Any, str]]


def _build(
    schema: _Schema, prefix: _Path, merged: _Merged, extra: Mapping[str, Any] | None = None
) -> Any:
    """The table's class built from the merged values; the class's validators run here.

    :raises ConfigurationError: naming every value at fault (its key and source), or the
        table when only a check spanning several fields fails.
    """
    owner = schema.owners[prefix]
    entries = {path: vo for path, vo in merged.items() if path[:-1] == prefix}
    try:
        return owner(**{path[-1]: value for path, (value, _) in entries.items()}, **(extra or {}))
    except (ValueError, TypeError) as exc:
        failure = exc
    # Find the values at fault to name their keys and sources. A check spanning several
    # fields (a minimum above a maximum) passes field by field and names the table.
    faults = []
    for path, (value, origin) in entries.items():
        leaf = schema.leaves[path]
        try:
            owner(**{leaf.alias: value})
        except (ValueError, TypeError) as exc:
            faults.append(str(_value_error(leaf, value, origin, exc)))
    if faults:
        _raise_problems(faults)
    reason = _reason(failure)
    for path, (value, _) in entries.items():
        if is_secret_key(path[-1]) and isinstance(value, str) and value:
            reason = reason.replace(value, REDACTED)
    sources = "; ".join(sorted({origin for _, origin in entries.values()}))
    where = f"[{'.'.join(prefix)}]" if prefix else "top-level"
    raise ConfigurationError(f"invalid {where} settings ({sources}): {reason}") from None


# ---------------------------------------------------------------------------------------
# Public entry points
# ---------------------------------------------------------------------------------------


def load_settings(
    pm: pluggy.PluginManager,
    *,
    path: Path | None = None,
    environ: Mapping[str, str] | None = None,
    overrides: Mapping[str, object] | None = None,
) -> Settings:
    """Load, validate and announce the settings.

    :param pm: the plugin manager; its `nxmesh_add_settings` implementations declare the
        plugin sections and its `nxmesh_configure` implementations receive the result.
    :param path: the TOML file; default ``$NXMESH_CONFIG``, else ``./nxmesh.toml`` when
        it exists. A file named explicitly (argument or variable) must exist.
    :param environ: the environment to read instead of `os.environ`.
    :param overrides: values from command-line flags, keyed by dotted name
        (``"master.api_port"``) or nested mappings; ``None`` values are ignored, so a
        CLI can pass every flag whether given or not.
    :raises ConfigurationError: an unknown key (with a suggestion), a bad value (naming
        key, source and reason), an unreadable file, a clash between plugin sections.

    Call it once per plugin manager: `nxmesh_configure` is historic, so each call is
    replayed to plugins registered later.
    """
    env = os.environ if environ is None else environ
    registry = SettingsRegistry.collect(pm)
    schema = _Schema.build(registry.sections())

    def blocked(name: str) -> bool:
        return any(pm.is_blocked(n) for n in {name, name.replace("_", "-")})

    layers: list[_Layer] = []
    problems: list[str] = []
    config = _config_path(path, env)
    if config is not None:
        file_layer: _Layer = {}
        _walk(_read_file(config), (), f"in {config}", schema, blocked, file_layer, problems)
        layers.append(file_layer)
    layers.append(_env_layer(env, schema, blocked, problems))
    layers.append(_overrides_layer(overrides or {}, schema, blocked, problems))

    # Every layer is converted, even values a later layer overrides: a broken file is
    # reported now rather than when someone unsets the variable that hid it.
    merged: _Merged = {}
    for layer in layers:
        for key, (value, origin) in layer.items():
            try:
                merged[key] = (_convert(schema.leaves[key], value, origin), origin)
            except ConfigurationError as exc:
                problems.append(str(exc))

    # Every table is built, so its validators' complaints join the problems above: a
    # file with an unknown key and a port out of range hears of both at once.
    def build(prefix: _Path) -> Any:
        try:
            return _build(schema, prefix, merged)
        except _SettingsProblems as exc:
            problems.extend(exc.problems)
        except ConfigurationError as exc:
            problems.append(str(exc))
        return None

    sections = {name: build((name,)) for name in _CORE_SECTIONS}
    plugins = {name: build(("plugins", name)) for name in registry}
    _raise_problems(problems)
    settings: Settings = _build(schema, (), merged, {**sections, "plugins": plugins})

    pm.hook.nxmesh_configure.call_historic(kwargs={"settings": settings})
    return settings


def plugin_manager_options(
    *, path: Path | None = None, environ: Mapping[str, str] | None = None
) -> dict[str, Any]:
    """``disabled`` / ``strict`` / ``trace`` keyword arguments for `get_plugin_manager`.

    The plugin manager must exist before `load_settings` (plugins declare sections), so
    the three plugin-related settings are read from the file first with this. Only
    those three keys are looked at; the full validation happens in `load_settings`.
    Environment variables are not read here: `get_plugin_manager` reads them itself.
    """
    env = os.environ if environ is None else environ
    config = _config_path(path, env)
    data = _read_file(config) if config is not None else {}
    schema = _Schema.build({})
    wanted = {"disable_plugins": "disabled", "strict_plugins": "strict", "trace_hooks": "trace"}
    options: dict[str, Any] = {}
    for key, kwarg in wanted.items():
        if key in data:
            leaf = schema.leaves[(key,)]
            merged = {leaf.path: (_convert(leaf, data[key], f"in {config}"), f"in {config}")}
            options[kwarg] = getattr(_build(schema, (), merged), leaf.attr)
    return options


def _is_secret_field(field: attrs.Attribute[Any]) -> bool:
    return any(field.metadata.get(key) for key in SECRET_METADATA)


def settings_as_dict(settings: Settings, *, redact: bool = True) -> dict[str, Any]:
    """Plain data (str, int, float, bool, list, dict) for ``nxmesh config show``.

    With `redact`, secrets that are set show as ``***``, and so do URL passwords and the
    values of secret-looking ``name=value`` pairs inside strings (``?password=...``).
    """

    def plain(value: Any, name: str, secret: bool) -> Any:
        if redact and (secret or is_secret_key(name)) and value not in ("", None, ()):
            return REDACTED
        if attrs.has(type(value)):
            return {
                _alias(f): plain(getattr(value, f.name), _alias(f), _is_secret_field(f))
                for f in attrs.fields(type(value))
            }
        if isinstance(value, Mapping):
            return {str(k): plain(v, str(k), secret=False) for k, v in value.items()}
        if isinstance(value, list | tuple):
            return [plain(v, "", secret=False) for v in value]
        if isinstance(value, Path):
            return str(value)
        if isinstance(value, str) and redact:
            return redact_text(value)
        return value

    result: dict[str, Any] = plain(settings, "", secret=False)
    return result
