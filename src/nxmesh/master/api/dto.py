"""Request and response bodies through NxMesh's own converter, schema from the attrs models.

Litestar would decode attrs classes with msgspec, which stops at the first error, coerces
``"80"`` into ``80`` and spells ``Location.return_`` as ``return_``. Instead:

* `ConverterPlugin` gives every handler whose body or return type is an attrs class (or a
  list of them) a `ConverterDTO`: bodies are structured by `nxmesh.core.serialization`
  (strict types, unknown keys rejected, *every* problem reported with its field path),
  responses are unstructured by it (YAML/JSON spellings such as ``return``).
* `ModelSchemaPlugin` generates the OpenAPI 3.1 schema of those classes from their attrs
  fields, with the same spellings, required fields and ``additionalProperties: false``.

A body field named ``workspace`` defaults to the ``{workspace}`` path parameter and must
equal it when given, so a state cannot be written into another workspace by accident.
"""

from __future__ import annotations

import json
from collections.abc import Collection, Generator, Mapping
from typing import Any, ClassVar

import attrs
from litestar import Response
from litestar.dto import AbstractDTO
from litestar.dto.data_structures import DTOFieldDefinition
from litestar.openapi.spec import Reference, Schema
from litestar.plugins import SerializationPlugin
from litestar.plugins.attrs import AttrsSchemaPlugin
from litestar.typing import FieldDefinition

from nxmesh.core.errors import Problem, ValidationError
from nxmesh.core.serialization import structure, unstructure
from nxmesh.master.problems import BadRequest

__all__ = ["ConverterDTO", "ConverterPlugin", "ModelSchemaPlugin"]


def _key(attribute: attrs.Attribute[Any]) -> str:
    key = attribute.metadata.get("key", attribute.name)
    return key if isinstance(key, str) else attribute.name


class ConverterDTO(AbstractDTO[Any]):
    """(De)serialises one annotation with the NxMesh converter; see the module docstring."""

    annotation: ClassVar[Any] = Any

    @classmethod
    def generate_field_definitions(
        cls, model_type: type[Any]
    ) -> Generator[DTOFieldDefinition, None, None]:
        yield from ()  # the converter, not Litestar's DTO backend, does the work

    @classmethod
    def detect_nested_field(cls, field_definition: FieldDefinition) -> bool:
        return False

    @classmethod
    def is_supported_model_type_field(cls, field_definition: FieldDefinition) -> bool:
        return True

    @classmethod
    def create_for_field_definition(
        cls, field_definition: FieldDefinition, handler_id: str, backend_cls: Any = None
    ) -> None:
        return None

    @classmethod
    def create_openapi_schema(
        cls, field_definition: FieldDefinition, handler_id: str, schema_creator: Any
    ) -> Reference | Schema:
        if field_definition.is_subclass_of(Response) and field_definition.inner_types:
            # A handler returning Response[X] to pick its status code: document X.
            field_definition = field_definition.inner_types[0]
        result: Reference | Schema = schema_creator.for_field_definition(field_definition)
        return result

    def decode_bytes(self, value: bytes) -> Any:
        try:
            data = json.loads(value)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise BadRequest(f"the request body is not valid JSON: {exc}") from None
        return self.decode_builtins(data)

    def decode_builtins(self, value: Any) -> Any:
        annotation = self.annotation
        if isinstance(annotation, type) and attrs.has(annotation) and isinstance(value, dict):
            value = self._with_name(annotation, self._with_workspace(annotation, value))
        return structure(value, annotation, source="body")

    def _with_name(self, model: type[Any], data: dict[str, Any]) -> dict[str, Any]:
        """``PUT /sites/{name}`` with a body that names nothing: the URL's name, rather
        than "name: is required" (a body naming another is refused by the handler)."""
        path_name = self.asgi_connection.path_params.get("name")
        if path_name is None or "name" in data or "name" not in attrs.fields_dict(model):
            return data
        return {**data, "name": path_name}

    def _with_workspace(self, model: type[Any], data: dict[str, Any]) -> dict[str, Any]:
        path_workspace = self.asgi_connection.path_params.get("workspace")
        if path_workspace is None or "workspace" not in attrs.fields_dict(model):
            return data
        given = data.get("workspace", path_workspace)
        if given != path_workspace:
            raise ValidationError(
                [
                    Problem(
                        "workspace",
                        f"is {given!r} but the URL names workspace {path_workspace!r}; "
                        "leave it out or make them equal",
                    )
                ],
                source="body",
            )
        return {**data, "workspace": path_workspace}

    def data_to_encodable_type(self, data: Any | Collection[Any]) -> Any:
        if isinstance(data, Response):  # a handler choosing its status code
            data.content = unstructure(data.content)
            return data
        return unstructure(data)


class ConverterPlugin(SerializationPlugin):
    """Routes every attrs-typed body and response through `ConverterDTO`."""

    def supports_type(self, field_definition: FieldDefinition) -> bool:
        t = field_definition.annotation
        return isinstance(t, type) and attrs.has(t)

    def create_dto_for_type(self, field_definition: FieldDefinition) -> type[AbstractDTO[Any]]:
        name = getattr(field_definition.annotation, "__name__", "Model")
        return type(
            f"ConverterDTO[{name}]", (ConverterDTO,), {"annotation": field_definition.annotation}
        )


class ModelSchemaPlugin(AttrsSchemaPlugin):
    """OpenAPI schemas of attrs classes with NxMesh's field spellings and strictness."""

    def to_openapi_schema(self, field_definition: FieldDefinition, schema_creator: Any) -> Schema:
        cls = field_definition.type_
        hints = field_definition.get_type_hints(include_extras=True, resolve_generics=True)
        fields = [a for a in attrs.fields(cls) if a.init]
        properties: Mapping[str, FieldDefinition] = {
            _key(a): FieldDefinition.from_kwarg(hints[a.name], _key(a)) for a in fields
        }
        required = sorted(_key(a) for a in fields if a.default is attrs.NOTHING)
        schema: Schema = schema_creator.create_component_schema(
            field_definition, required=required, property_fields=properties
        )
        schema.additional_properties = False  # unknown keys are rejected, say so
        if cls.__doc__:
            schema.description = cls.__doc__.strip().split("\n\n", 1)[0]
        return schema
