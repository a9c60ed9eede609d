"""The error hierarchy: every error NxMesh raises on purpose derives from `NxMeshError`."""

from __future__ import annotations

import attrs

__all__ = [
    "ApplyVetoedError",
    "ConfigurationError",
    "DuplicateProviderError",
    "NxMeshError",
    "PluginLoadError",
    "Problem",
    "ProviderNotFoundError",
    "ValidationError",
]


class NxMeshError(Exception):
    """Base class of every error NxMesh raises on purpose."""


@attrs.frozen
class Problem:
    """One thing wrong with some input: where (a field path) and why.

    `path` names the field the way a user would find it in their file,
    e.g. ``sites[2].locations[0].path``; `severity` is ``error`` (blocks) or ``warning``.
    """

    path: str
    message: str
    severity: str = "error"

    def __str__(self) -> str:
        where = self.path or "<root>"
        return f"{where}: {self.message}"


class ValidationError(NxMeshError):
    """Input was rejected; carries *all* problems found, not only the first."""

    def __init__(self, problems: list[Problem], *, source: str | None = None) -> None:
        self.problems = list(problems)
        self.source = source
        prefix = f"{source}: " if source else ""
        lines = "\n".join(f"  - {prefix}{p}" for p in self.problems)
        noun = "problem" if len(self.problems) == 1 else "problems"
        super().__init__(f"{len(self.problems)} {noun}:\n{lines}")


class ConfigurationError(NxMeshError):
    """Settings are wrong (unknown key, bad value, missing file)."""


class PluginLoadError(NxMeshError):
    """A plugin's entry point could not be loaded or registered."""

    def __init__(self, entry_point: str, distribution: str, reason: str) -> None:
        self.entry_point = entry_point
        self.distribution = distribution
        self.reason = reason
        super().__init__(
            f"plugin {entry_point!r} from distribution {distribution!r} failed to load: {reason}"
        )


class DuplicateProviderError(NxMeshError):
    """Two plugins registered a provider of the same kind under the same name."""

    def __init__(self, kind: str, name: str, first: str, second: str) -> None:
        self.kind, self.name, self.first, self.second = kind, name, first, second
        super().__init__(
            f"{kind} provider name {name!r} is registered twice: by plugin {first!r} "
            f"and by plugin {second!r}; block one of them (NXMESH_DISABLE_PLUGINS)"
        )


class ProviderNotFoundError(NxMeshError):
    """Settings asked for a provider no loaded plugin registers."""


class ApplyVetoedError(NxMeshError):
    """A `nxmesh_before_apply` implementation refused an update."""
