"""Load desired state from YAML or JSON files, reporting every problem with file and field.

YAML is read with a safe loader (no Python tags), duplicate keys are errors (PyYAML and
``json`` would silently keep the last one), alias expansion is bounded (no "billion
laughs"), and files are capped in size. Several files merge into one state: their sites,
upstreams, certificates and streams are concatenated and checked together, so a site in
one file may use an upstream from another while a name defined twice is an error.

Every failure is a `ValidationError`. For one file its ``source`` is the file and paths
are field paths (``sites[0].name``); syntax errors say ``line L, column C``. When problems
span several files, ``source`` is None and each path starts with ``<file>: ``.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import attrs
import yaml
from cattrs.errors import ClassValidationError, IterableValidationError

from nxmesh.core.errors import Problem, ValidationError
from nxmesh.core.model import DesiredState, StateParts, check_parts, submission_problems
from nxmesh.core.serialization import converter, problems_from_exception
from nxmesh.core.validation import NAME, Invalid, join_path

__all__ = ["MAX_FILE_BYTES", "MAX_YAML_NODES", "load_state_file", "load_state_files"]

MAX_FILE_BYTES = 32 * 1024 * 1024
# Nodes after expanding aliases: generous for 10,000 sites, fatal to alias bombs.
MAX_YAML_NODES = 5_000_000

_SafeLoader: Any = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
_MERGE_TAG = "tag:yaml.org,2002:merge"
_IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]*", re.ASCII)


class _FileProblems(Exception):
    """Internal: problems found while reading one file."""

    def __init__(self, problems: list[Problem]) -> None:
        super().__init__(problems)
        self.problems = problems


def _key_path(path: str, key: str) -> str:
    return join_path(path, key if _IDENTIFIER.fullmatch(key) else f"[{key!r}]")


def _at(mark: Any) -> str:
    return f"line {mark.line + 1}, column {mark.column + 1}"


# ---------------------------------------------------------------------------------------
# Reading
# ---------------------------------------------------------------------------------------


def _read_text(path: Path) -> str:
    with path.open("rb") as f:
        raw = f.read(MAX_FILE_BYTES + 1)
    if len(raw) > MAX_FILE_BYTES:
        raise _FileProblems([Problem("", f"file is larger than {MAX_FILE_BYTES} bytes")])
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise _FileProblems(
            [Problem("", f"is not UTF-8 text (byte {exc.start}: {exc.reason})")]
        ) from None


def _inspect_yaml(root: yaml.Node) -> list[Problem]:
    """Duplicate keys (with paths and lines) and the expanded size of the node graph."""
    problems: list[Problem] = []
    visited: set[int] = set()
    sizes: dict[int, int] = {}

    def size(node: yaml.Node) -> int:
        # Memoised by identity: an alias repeats a node without re-walking it.
        if id(node) not in sizes:
            sizes[id(node)] = 0  # a cycle (recursive alias) counts once
            children: list[yaml.Node] = []
            if isinstance(node, yaml.MappingNode):
                children = [n for pair in node.value for n in pair]
            elif isinstance(node, yaml.SequenceNode):
                children = list(node.value)
            total = 1
            for child in children:
                total += size(child)
                if total > MAX_YAML_NODES:
                    break
            sizes[id(node)] = total
        return sizes[id(node)]

    def walk(node: yaml.Node, path: str) -> None:
        if id(node) in visited:
            return
        visited.add(id(node))
        if isinstance(node, yaml.SequenceNode):
            for i, item in enumerate(node.value):
                walk(item, f"{path}[{i}]")
        elif isinstance(node, yaml.MappingNode):
            first: dict[tuple[str, str], yaml.Node] = {}
            for key_node, value_node in node.value:
                if key_node.tag == _MERGE_TAG or not isinstance(key_node, yaml.ScalarNode):
                    continue
                key = str(key_node.value)
                here = _key_path(path, key)
                seen = first.setdefault((key_node.tag, key), key_node)
                if seen is not key_node:
                    problems.append(
                        Problem(
                            here,
                            f"duplicate key {key!r} at {_at(key_node.start_mark)} "
                            f"(first at {_at(seen.start_mark)})",
                        )
                    )
                walk(value_node, here)

    walk(root, "")
    if size(root) > MAX_YAML_NODES:
        problems.append(
            Problem("", f"expands to more than {MAX_YAML_NODES} nodes (too many aliases)")
        )
    return problems


def _parse_yaml(text: str) -> object:
    loader = _SafeLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        if problems := _inspect_yaml(node):
            raise _FileProblems(problems)
        return loader.construct_document(node)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        where = f" at {_at(mark)}" if mark is not None else ""
        what = "; ".join(str(p) for p in (exc.context, exc.problem) if p)
        kind = (
            "unsupported YAML"
            if isinstance(exc, yaml.constructor.ConstructorError)
            else ("YAML syntax error")
        )
        raise _FileProblems([Problem("", f"{kind}{where}: {what}")]) from None
    except yaml.YAMLError as exc:
        raise _FileProblems([Problem("", f"YAML error: {exc}")]) from None
    finally:
        loader.dispose()


@attrs.frozen
class _JsonObject:
    """A JSON object before duplicate keys were checked (json keeps only the last)."""

    pairs: list[tuple[str, Any]]


def _json_tree(value: object, path: str, problems: list[Problem]) -> object:
    if isinstance(value, list):
        return [_json_tree(item, f"{path}[{i}]", problems) for i, item in enumerate(value)]
    if isinstance(value, _JsonObject):
        result: dict[str, object] = {}
        for key, item in value.pairs:
            here = _key_path(path, key)
            if key in result:
                problems.append(Problem(here, f"duplicate key {key!r}"))
            result[key] = _json_tree(item, here, problems)
        return result
    return value


def _parse_json(text: str) -> object:
    try:
        tree = json.loads(text, object_pairs_hook=_JsonObject)
    except json.JSONDecodeError as exc:
        raise _FileProblems(
            [Problem("", f"JSON syntax error at line {exc.lineno}, column {exc.colno}: {exc.msg}")]
        ) from None
    problems: list[Problem] = []
    data = _json_tree(tree, "", problems)
    if problems:
        raise _FileProblems(problems)
    return data


def _read_data(path: Path) -> object:
    """The plain data of one file; an empty file is an empty state."""
    text = _read_text(path)
    try:
        data = _parse_json(text) if path.suffix.lower() == ".json" else _parse_yaml(text)
    except RecursionError:
        raise _FileProblems([Problem("", "is nested too deeply")]) from None
    return {} if data is None else data


# ---------------------------------------------------------------------------------------
# Merging
# ---------------------------------------------------------------------------------------

_KINDS = ("sites", "upstreams", "certificates")
# Streams are judged only by the rules of new input, on the merged state: every file read.
_INDEXED = re.compile(r"\b(sites|upstreams|certificates|streams)\[(\d+)\]")


@attrs.frozen
class _Origin:
    """Where merged item ``kind[i]`` came from: ``origins[kind][i] == (file, local index)``."""

    origins: dict[str, list[tuple[str, int]]]

    def locate(self, problem: Problem, default: str) -> tuple[str, Problem]:
        """Rewrite a merged-state problem into the file and indices the user wrote."""
        m = _INDEXED.match(problem.path)
        if m is None:
            return default, problem
        file, local = self.origins[m.group(1)][int(m.group(2))]

        def relocal(match: re.Match[str]) -> str:
            other_file, other = self.origins[match.group(1)][int(match.group(2))]
            suffix = "" if other_file == file else f" in {other_file}"
            return f"{match.group(1)}[{other}]{suffix}"

        path = f"{m.group(1)}[{local}]{problem.path[m.end() :]}"
        message = _INDEXED.sub(relocal, problem.message)
        return file, attrs.evolve(problem, path=path, message=message)


def _raise(found: Sequence[tuple[str, Problem]]) -> None:
    if not found:
        return
    files = {file for file, _ in found}
    if len(files) == 1:
        raise ValidationError([p for _, p in found], source=files.pop())
    raise ValidationError(
        [attrs.evolve(p, path=f"{file}: {p.path}" if p.path else file) for file, p in found]
    )


def _structure_file(
    source: str, data: object, found: list[tuple[str, Problem]]
) -> tuple[DesiredState | None, StateParts]:
    """One file's state (None when invalid; its field problems go to `found`) and parts.

    Not `structure`, which cross-checks an invalid state on its own: a file may be one
    part of the state, so its cross-object checks wait for the merge.
    """
    try:
        state = converter.structure(data, DesiredState)
    except (ClassValidationError, IterableValidationError, TypeError, ValueError) as exc:
        found += [(source, p) for p in problems_from_exception(exc)]
        return None, StateParts.salvage(data, converter.structure)
    return state, StateParts.of(state)


def load_state_files(paths: Iterable[str | os.PathLike[str]]) -> DesiredState:
    """Load and merge several state files into one checked `DesiredState`.

    Sites, upstreams, certificates and streams are concatenated in file order; the workspace is
    the one the files name (they must agree) or ``default``. Raises `ValidationError`
    with every problem of every file: field problems and, among the objects that passed
    them, cross-object problems, in one pass. `OSError` when a file cannot be read.
    """
    found: list[tuple[str, Problem]] = []
    files: list[tuple[str, DesiredState | None, StateParts]] = []
    workspaces: dict[str, str] = {}
    given: dict[Path, str] = {}
    for path in map(Path, paths):
        source = str(path)
        # Twice the same file would clash with itself ("'app' is already used by
        # upstreams[0]", about upstreams[0]): say what happened instead.
        resolved = path.resolve()
        if resolved in given:
            first = given[resolved]
            same = "" if first == source else f" as {first}"
            found.append((source, Problem("", f"is the same file{same}, given twice")))
            continue
        given[resolved] = source
        try:
            data = _read_data(path)
        except _FileProblems as exc:
            found += [(source, p) for p in exc.problems]
            # What this file defines is unknown, so references are not judged.
            files.append((source, None, StateParts(unknown=frozenset(_KINDS))))
            continue
        files.append((source, *_structure_file(source, data, found)))
        workspace = data.get("workspace") if isinstance(data, dict) else None
        if isinstance(workspace, str) and NAME.reason(workspace) is None:
            workspaces.setdefault(workspace, source)
    if len(workspaces) > 1:
        (first, first_file), *rest = workspaces.items()
        for name, file in rest:
            found.append(
                (file, Problem("workspace", f"is {name!r} but {first_file} says {first!r}"))
            )

    default = files[0][0] if files else "<no files>"
    states = [state for _, state, _ in files if state is not None]
    state: DesiredState | None = None
    if len(states) == len(files):
        try:
            state = DesiredState(
                sites=tuple(site for part in states for site in part.sites),
                upstreams=tuple(u for part in states for u in part.upstreams),
                certificates=tuple(c for part in states for c in part.certificates),
                streams=tuple(s for part in states for s in part.streams),
                workspace=next(iter(workspaces), "default"),
            )
        except Invalid as exc:
            found += [
                (default, Problem(p, f"{why} (all files together)")) for p, why in exc.problems
            ]

    origins: dict[str, list[tuple[str, int]]] = {kind: [] for kind in _KINDS}
    for source, _, parts in files:
        for kind in _KINDS:
            origins[kind] += [(source, i) for i in range(len(getattr(parts, kind)))]
    origins["streams"] = [
        (source, i)
        for source, part, _ in files
        if part is not None
        for i in range(len(part.streams))
    ]
    merged = StateParts.concat(parts for _, _, parts in files)
    origin = _Origin(origins)
    found += [origin.locate(p, default) for p in check_parts(merged) if p.severity == "error"]
    if state is not None:  # the rules for new input, as the master applies them
        found += [
            origin.locate(p, default) for p in submission_problems(state) if p.severity == "error"
        ]
    _raise(found)
    assert state is not None  # every file structured and nothing was found
    return state


def load_state_file(path: str | os.PathLike[str]) -> DesiredState:
    """Load one YAML (or ``.json``) state file into a checked `DesiredState`."""
    return load_state_files([path])
