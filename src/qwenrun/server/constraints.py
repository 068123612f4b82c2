"""A request's output constraint: OpenAI's ``response_format``, vLLM's ``structured_outputs`` and
its older ``guided_*`` fields, or a forced tool call, as one ``StructuredOutputsParams``.

At most one may be given (two constraints on one answer would be ambiguous: a 400 says so, never
one silently winning); an unknown kind or a malformed one is a 400 naming the field."""
from __future__ import annotations

from typing import Any

from ..sampling_params import StructuredOutputsParams
from .protocol import APIError

_GUIDED = {"guided_json": "json", "guided_regex": "regex", "guided_choice": "choice", "guided_grammar": "grammar"}


def from_response_format(rf: dict[str, Any] | None) -> StructuredOutputsParams | None:
    if rf is None:
        return None
    kind = rf.get("type")
    if kind == "text":
        return None
    if kind == "json_object":
        # Some clients (instructor's JSON modes for OpenAI-like hosts) send the schema alongside:
        # honour it rather than drop it.
        schema = rf.get("schema")
        if schema is not None:
            if not isinstance(schema, dict):
                raise APIError(400, "response_format.schema must be a JSON Schema object", param="response_format")
            return StructuredOutputsParams(json=schema)
        return StructuredOutputsParams(json_object=True)
    if kind == "json_schema":
        js = rf.get("json_schema")
        if not isinstance(js, dict):
            raise APIError(400, "response_format.json_schema is missing: give {'name': ..., 'schema': {...}}",
                           param="response_format")
        schema = js.get("schema")
        if schema is None:
            raise APIError(400, "response_format.json_schema.schema is missing (a JSON Schema object)",
                           param="response_format")
        if not isinstance(schema, dict):
            raise APIError(400, "response_format.json_schema.schema must be a JSON Schema object",
                           param="response_format")
        if "strict" in js and js["strict"] is not None and not isinstance(js["strict"], bool):
            raise APIError(400, "response_format.json_schema.strict must be a boolean", param="response_format")
        return StructuredOutputsParams(json=schema)
    raise APIError(400, f"response_format.type must be 'text', 'json_object' or 'json_schema'; got {kind!r}",
                   param="response_format")


def request_constraint(req: Any, forced: StructuredOutputsParams | None = None) -> tuple[StructuredOutputsParams | None, str | None]:
    """(the constraint, the request field it came from) for a chat or completion request."""
    found: list[tuple[str, StructuredOutputsParams]] = []
    if forced is not None:
        found.append(("tool_choice", forced))
    rf = from_response_format(getattr(req, "response_format", None))
    if rf is not None:
        found.append(("response_format", rf))
    so = getattr(req, "structured_outputs", None)
    if so is not None:
        try:
            found.append(("structured_outputs", StructuredOutputsParams.coerce(so)))
        except (ValueError, TypeError) as e:
            raise APIError(400, str(e), param="structured_outputs") from None
    for name, field in _GUIDED.items():
        value = getattr(req, name, None)
        if value is not None:
            try:
                found.append((name, StructuredOutputsParams(**{field: value})))
            except ValueError as e:
                raise APIError(400, f"{name}: {e}", param=name) from None
    if len(found) > 1:
        raise APIError(400, f"give one output constraint, not several: {', '.join(n for n, _ in found)}",
                       param=found[1][0])
    return (found[0][1], found[0][0]) if found else (None, None)
