"""The one cattrs converter, and the functions that turn its errors into `Problem` lists.

`converter` is strict where YAML and JSON are loose: a string is never coerced from a
number, ``"yes"`` is not a boolean, a string is not a list of characters, and unknown keys
are errors. Every attrs field whose validator is a `nxmesh.core.validation.FieldCheck` is
checked while structuring, so one pass reports *all* problems, each at its path::

    sites[2].locations[0].path: contains ';' which would end an nginx directive; ...

Paths use attribute names joined by ``.``, list indices and mapping keys in brackets
(``agents[0].labels['env']``), and YAML spellings where they differ (``return``).
"""

from __future__ import annotations

import hashlib
import json
import json.encoder
import re
from collections.abc import Callable, Mapping
from typing import Any, Final, Literal, TypeVar, get_args, get_origin

import attrs
import cattrs
from cattrs.errors import (
    ClassValidationError,
    ForbiddenExtraKeysError,
    IterableValidationError,
    IterableValidationNote,
)
from cattrs.gen import make_dict_structure_fn, make_dict_unstructure_fn, override

from nxmesh.core.errors import Problem, ValidationError
from nxmesh.core.hints import closest
from nxmesh.core.model import (
    DesiredState,
    FrozenMap,
    StateParts,
    TLSConfig,
    check_parts,
    check_state,
)
from nxmesh.core.validation import FieldCheck, Invalid, describe, join_path, quote_hint, type_name

__all__ = [
    "canonical_json",
    "converter",
    "problems_from_exception",
    "state_digest",
    "structure",
    "structure_state",
    "unstructure",
]

T = TypeVar("T")
Hook = Callable[[Any, Any], Any]

converter = cattrs.Converter(detailed_validation=True, forbid_extra_keys=True)


# ---------------------------------------------------------------------------------------
# Strict primitives: no silent coercion
# ---------------------------------------------------------------------------------------


class WrongTypeError(TypeError):
    """A value of the wrong type. The message shows a preview of the value; `redacted`
    says the same without it, for fields that hold secrets (``repr=False``)."""

    def __init__(self, expected: str, value: object, *, hint: str = "") -> None:
        self.redacted = f"must be {expected}, got {type_name(value)}{hint}"
        super().__init__(f"must be {expected}, got {describe(value)}{hint}")


def _structure_str(value: object, _: object) -> str:
    if not isinstance(value, str):
        raise WrongTypeError("a string", value, hint=quote_hint(value))
    return value


def _structure_int(value: object, _: object) -> int:
    if not isinstance(value, int) or isinstance(value, bool):
        raise WrongTypeError("an integer", value)
    return value


def _structure_float(value: object, _: object) -> float:
    if not isinstance(value, int | float) or isinstance(value, bool):
        raise WrongTypeError("a number", value)
    return float(value)


def _structure_bool(value: object, _: object) -> bool:
    if not isinstance(value, bool):
        raise WrongTypeError("true or false", value)
    return value


converter.register_structure_hook(str, _structure_str)
converter.register_structure_hook(int, _structure_int)
converter.register_structure_hook(float, _structure_float)
converter.register_structure_hook(bool, _structure_bool)


def _is_literal(t: Any) -> bool:
    return get_origin(t) is Literal


def _structure_literal(value: object, t: Any) -> Any:
    choices = get_args(t)
    for choice in choices:
        if type(value) is type(choice) and value == choice:
            return value
    shown = ", ".join(repr(c) for c in choices)
    raise ValueError(f"must be one of {shown}, got {describe(value)}")


converter.register_structure_hook_func(_is_literal, _structure_literal)


def _note(exc: Exception, index: int | str, t: Any) -> Exception:
    note = IterableValidationNote(f"Structuring @ index {index!r}", index, t)
    exc.__notes__ = [*getattr(exc, "__notes__", []), note]
    return exc


def _is_tuple(t: Any) -> bool:
    args = get_args(t)
    return get_origin(t) is tuple and len(args) == 2 and args[1] is Ellipsis


def _tuple_hook(t: Any) -> Hook:
    item_type = get_args(t)[0]
    item_hook = converter.get_structure_hook(item_type)

    def structure_tuple(value: object, _: object) -> tuple[Any, ...]:
        # A str is iterable too; without this check "example.com" became 11 names.
        if not isinstance(value, list | tuple):
            raise TypeError(f"must be a list, got {describe(value)}")
        items, errors = [], []
        for i, item in enumerate(value):
            try:
                items.append(item_hook(item, item_type))
            except Exception as exc:  # collected, reported with its index
                errors.append(_note(exc, i, item_type))
        if errors:
            raise IterableValidationError(f"While structuring {t!r}", errors, t)
        return tuple(items)

    return structure_tuple


def _is_mapping(t: Any) -> bool:
    return get_origin(t) in (Mapping, dict)


def _mapping_hook(t: Any) -> Hook:
    key_type, value_type = get_args(t)
    key_hook = converter.get_structure_hook(key_type)
    value_hook = converter.get_structure_hook(value_type)

    def structure_mapping(value: object, _: object) -> FrozenMap[Any, Any]:
        if not isinstance(value, Mapping):
            raise TypeError(f"must be a mapping, got {describe(value)}")
        items, errors = {}, []
        for key, item in value.items():
            try:
                items[key_hook(key, key_type)] = value_hook(item, value_type)
            except Exception as exc:  # collected, reported with its key
                errors.append(_note(exc, key if isinstance(key, str) else repr(key), value_type))
        if errors:
            raise IterableValidationError(f"While structuring {t!r}", errors, t)
        return FrozenMap(items)

    return structure_mapping


converter.register_structure_hook_factory(_is_tuple, _tuple_hook)
converter.register_structure_hook_factory(_is_mapping, _mapping_hook)


# ---------------------------------------------------------------------------------------
# attrs classes: field-by-field validation, YAML key spellings, no unknown keys
# ---------------------------------------------------------------------------------------


def _key(a: attrs.Attribute[Any]) -> str:
    key = a.metadata.get("key", a.name)
    assert isinstance(key, str)
    return key


def _checked_hook(a: attrs.Attribute[Any], check: FieldCheck) -> Hook:
    """Structure one field by its type, convert it like attrs would, then run its check."""
    base = converter.get_structure_hook(a.type)
    convert = a.converter if callable(a.converter) else None

    def structure_field(value: object, t: Any) -> Any:
        result = base(value, t)
        if convert is not None:
            result = convert(result)
        problems = check.problems(result)
        if problems:
            raise Invalid(problems)
        return result

    return structure_field


def _attrs_structure_hook(cl: type[Any]) -> Hook:
    attrs.resolve_types(cl)
    overrides: dict[str, Any] = {}
    for a in attrs.fields(cl):
        hook = _checked_hook(a, a.validator) if isinstance(a.validator, FieldCheck) else None
        overrides[a.name] = override(rename=a.metadata.get("key"), struct_hook=hook)
    generated = make_dict_structure_fn(
        cl,
        converter,
        _cattrs_forbid_extra_keys=True,
        _cattrs_detailed_validation=True,
        **overrides,
    )

    def structure_object(value: object, t: Any) -> Any:
        if not isinstance(value, Mapping):
            raise TypeError(f"must be a mapping of fields, got {describe(value)}")
        return generated(value, t)

    return structure_object


def _attrs_unstructure_hook(cl: type[Any]) -> Callable[[Any], Any]:
    attrs.resolve_types(cl)
    overrides: dict[str, Any] = {
        a.name: override(
            rename=a.metadata.get("key"), omit_if_default=a.metadata.get("omit_default", False)
        )
        for a in attrs.fields(cl)
        if "key" in a.metadata or "omit_default" in a.metadata
    }
    return make_dict_unstructure_fn(cl, converter, **overrides)


converter.register_structure_hook_factory(attrs.has, _attrs_structure_hook)
converter.register_unstructure_hook_factory(attrs.has, _attrs_unstructure_hook)

_structure_tls_mapping = _attrs_structure_hook(TLSConfig)


def _structure_tls(value: object, t: Any) -> TLSConfig:
    # YAML shorthand: ``tls: acme`` means "get certificates for my server names by ACME".
    if value == "acme":
        return TLSConfig(acme=True)
    if isinstance(value, str):
        raise TypeError(
            f"the only shorthand is 'acme', got {describe(value)}; otherwise write a mapping "
            "like {certificate: my-cert}"
        )
    result = _structure_tls_mapping(value, t)
    assert isinstance(result, TLSConfig)
    return result


converter.register_structure_hook(TLSConfig, _structure_tls)


# ---------------------------------------------------------------------------------------
# From a cattrs exception tree to problems
# ---------------------------------------------------------------------------------------

_IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]*", re.ASCII)
# Keys people copy from ingress-nginx annotations or raw nginx; answered with the reason.
_DIRECTIVE_HINTS = ("snippet", "directive", "lua", "module", "include", "raw", "nginx", "_by_")


def _keys_of(cl: type[Any]) -> dict[str, str]:
    """Attribute name → YAML key for an attrs class (identity for anything else)."""
    if not attrs.has(cl):
        return {}
    return {a.name: _key(a) for a in attrs.fields(cl)}


def _key_path(path: str, key: object) -> str:
    if isinstance(key, str) and _IDENTIFIER.fullmatch(key):
        return join_path(path, key)
    return join_path(path, f"[{key!r}]")


# Unknown fields of one object described one by one (with a did-you-mean); beyond, one
# problem names the first few and their count.
_UNKNOWN_EACH: Final = 5


def _unknown_key_message(cl: type[Any], key: object) -> str:
    allowed = sorted(_keys_of(cl).values())
    close = closest(str(key), allowed)
    if close:
        return f"unknown field {key!r}; did you mean {close!r}?"
    listing = ", ".join(allowed)
    if any(hint in str(key).lower() for hint in _DIRECTIVE_HINTS):
        return (
            f"unknown field {key!r}: NxMesh has no free-form nginx directives or snippets, "
            f"only typed fields ({listing})"
        )
    return f"unknown field {key!r}; the fields here are: {listing}"


def problems_from_exception(
    exc: BaseException, path: str = "", *, secret: bool = False
) -> list[Problem]:
    """Flatten an exception raised by `converter` into problems with user-facing paths.

    Problems inside a secret field (``repr=False``: passwords, keys, tokens) never quote
    the value. Exceptions that are not about the input (bugs) are re-raised.
    """
    if isinstance(exc, IterableValidationError):
        found: list[Problem] = []
        with_notes, without = exc.group_exceptions()
        for sub, note in with_notes:
            index = f"[{note.index}]" if isinstance(note.index, int) else f"[{note.index!r}]"
            found += problems_from_exception(sub, join_path(path, index), secret=secret)
        for sub in without:
            found += problems_from_exception(sub, path, secret=secret)
        return found
    if isinstance(exc, ClassValidationError):
        found = []
        names = _keys_of(exc.cl)
        hidden = {a.name for a in attrs.fields(exc.cl) if not a.repr}
        attr_notes, others = exc.group_exceptions()
        for sub, attr_note in attr_notes:
            found += problems_from_exception(
                sub,
                join_path(path, names.get(attr_note.name, attr_note.name)),
                secret=secret or attr_note.name in hidden,
            )
        for sub in others:
            found += problems_from_exception(sub, path, secret=secret)
        return found
    if secret and isinstance(exc, TypeError | ValueError) and not isinstance(exc, Invalid):
        # Invalid comes from the field's own checks, which describe secrets without them.
        reason = exc.redacted if isinstance(exc, WrongTypeError) else "is not valid"
        return [Problem(path, f"{reason} (the value is secret and not shown)")]
    if isinstance(exc, ForbiddenExtraKeysError):
        extra = sorted(exc.extra_fields, key=repr)
        if len(extra) <= _UNKNOWN_EACH:
            return [
                Problem(_key_path(path, key), _unknown_key_message(exc.cl, key)) for key in extra
            ]
        # Many at once is not a typo: one problem, without a did-you-mean for each (an
        # agent's frame with thousands made the master spend seconds on its message).
        shown = ", ".join(repr(key) for key in extra[:_UNKNOWN_EACH])
        allowed = ", ".join(sorted(_keys_of(exc.cl).values()))
        return [
            Problem(
                path or "<root>",
                f"has {len(extra)} unknown fields ({shown}, ...); the fields here are: {allowed}",
            )
        ]
    if isinstance(exc, Invalid):
        return [Problem(join_path(path, rel), reason) for rel, reason in exc.problems]
    if isinstance(exc, KeyError):
        return [Problem(path, "is required")]
    if isinstance(exc, TypeError | ValueError):
        return [Problem(path, str(exc))]
    if isinstance(exc, BaseExceptionGroup):
        return [
            p for sub in exc.exceptions for p in problems_from_exception(sub, path, secret=secret)
        ]
    raise exc


# ---------------------------------------------------------------------------------------
# Public functions
# ---------------------------------------------------------------------------------------


def structure(data: object, cl: type[T], *, source: str | None = None) -> T:
    """Build a `cl` from plain data, or raise `ValidationError` listing every problem.

    Only the objects' own rules are checked; use `structure_state` for a complete state.
    A `DesiredState` that fails them is taken to be complete: its cross-object problems,
    among the parts that passed, are reported with the field problems in one go.
    """
    try:
        return converter.structure(data, cl)
    except (ClassValidationError, IterableValidationError, TypeError, ValueError) as exc:
        problems = problems_from_exception(exc)
    if cl is DesiredState:
        problems += check_parts(StateParts.salvage(data, converter.structure))
    raise ValidationError(problems, source=source)


def structure_state(data: object, *, source: str | None = None) -> DesiredState:
    """Build a `DesiredState` and run `check_state` on it; raise `ValidationError` with all
    problems. `source` (a file name, "api"...) is carried by the error for display."""
    state = structure(data, DesiredState, source=source)
    problems = [p for p in check_state(state) if p.severity == "error"]
    if problems:
        raise ValidationError(problems, source=source)
    return state


def unstructure(obj: object) -> Any:
    """Plain JSON/YAML-ready data: dicts, lists, str, int, float, bool and None."""
    return converter.unstructure(obj)


_CANONICAL: Final = json.JSONEncoder(
    sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
)


def _canonical_encoder() -> Callable[[object], str]:
    """`_CANONICAL.encode`, with the C encoder built once instead of on every call.

    Every frame's body is one small message, and building the encoder was half the cost of
    encoding one. No circular-reference markers: unstructured data is a tree.
    """
    # CPython's C encoder factory (what `JSONEncoder.iterencode` calls); not in typeshed.
    make: Callable[..., Callable[[object, int], list[str]]] | None = getattr(
        json.encoder, "c_make_encoder", None
    )
    if make is None:  # CPython without its accelerator
        return _CANONICAL.encode
    encoder = make(
        None,
        _CANONICAL.default,
        json.encoder.encode_basestring,
        None,
        _CANONICAL.key_separator,
        _CANONICAL.item_separator,
        True,  # sort_keys
        False,  # skipkeys
        False,  # allow_nan
    )

    def encode(data: object) -> str:
        return "".join(encoder(data, 0))

    return encode


_encode_canonical: Final = _canonical_encoder()


def canonical_json(obj: object) -> bytes:
    """Deterministic UTF-8 JSON (sorted keys, no whitespace) for hashing and signing.

    Raises ValueError for NaN or infinities, which have no canonical JSON form.
    """
    return _encode_canonical(unstructure(obj)).encode("utf-8")


def state_digest(state: DesiredState) -> str:
    """The content address of a state: hex sha256 of its canonical JSON."""
    return hashlib.sha256(canonical_json(state)).hexdigest()
