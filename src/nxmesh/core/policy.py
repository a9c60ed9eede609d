"""Run the ``nxmesh_validate_state`` policy hooks over an already-structured state."""

from __future__ import annotations

import pluggy

from nxmesh.core.errors import Problem, ValidationError
from nxmesh.core.model import DesiredState, check_state


def policy_problems(pm: pluggy.PluginManager, state: DesiredState) -> list[Problem]:
    """Every problem the policy plugins report, in plugin order."""
    results = pm.hook.nxmesh_validate_state(state=state)
    return [problem for result in results for problem in result or ()]


def enforce_policy(
    pm: pluggy.PluginManager, state: DesiredState, *, source: str | None = None
) -> list[Problem]:
    """Raise `ValidationError` when any policy problem is an error; return the warnings
    the master would give for `state`: the model's (`check_state`), then the policy
    plugins'."""
    problems = policy_problems(pm, state)
    errors = [p for p in problems if p.severity == "error"]
    if errors:
        raise ValidationError(errors, source=source)
    return [p for p in check_state(state) if p.severity == "warning"] + problems
