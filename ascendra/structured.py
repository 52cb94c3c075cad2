"""Structured output: the request fields that constrain what a request may generate, turned into
one regular expression. The worker compiles it against the vocabulary with outlines-core and masks
every sampling step to the tokens that keep the output inside it (``workers/guided.py``).

Fields, as vLLM's OpenAI server takes them (at most one per request):
- ``response_format``: ``{"type": "json_schema", "json_schema": {"schema": {...}}}``, or
  ``{"type": "json_object"}`` (a JSON object of strings, numbers, booleans, nulls and flat arrays
  of them: a regular expression cannot nest without bound, and a deeper generic one takes a
  worker seconds to compile; give a schema for nested objects), or ``{"type": "text"}`` (none);
- ``guided_json``: a JSON schema (an object or its text);
- ``guided_regex``: a regular expression (outlines-core's syntax, Rust ``regex`` flavour);
- ``guided_choice``: a list of strings, the output is exactly one of them;
- ``structured_outputs`` (vLLM >= 0.11, which dropped ``guided_*``): ``{"json": schema}``,
  ``{"regex": ...}``, ``{"choice": [...]}`` or ``{"json_object": true}``, with
  ``disable_any_whitespace`` or ``whitespace_pattern`` for the whitespace JSON may hold.
"""

from __future__ import annotations

import json
from functools import lru_cache
from typing import Any

from outlines_core import Index, Vocabulary
from outlines_core.json_schema import BOOLEAN, NULL, NUMBER, STRING, WHITESPACE, build_regex_from_schema

from ascendra.protocol import APIError

# The regex travels to the worker with every request and is compiled there once per distinct
# text: a bound keeps one request from making a worker compile for seconds.
MAX_REGEX_CHARS = 32_768
_REGEX_META = set(r"\.+*?()|[]{}^$-&~#")
FIELDS = ("response_format", "guided_json", "guided_regex", "guided_choice", "structured_outputs")
# structured_outputs keys: the four kinds, the two whitespace options, and what is not served.
_SO_KINDS = ("json", "regex", "choice", "json_object")
_SO_UNSUPPORTED = ("grammar", "structural_tag", "disable_additional_properties")


@lru_cache(maxsize=8)
def json_object_regex(ws: str = WHITESPACE) -> str:
    scalar = f"({STRING}|{NUMBER}|{BOOLEAN}|{NULL})"
    value = rf"({scalar}|\[{ws}({scalar}({ws},{ws}{scalar})*)?{ws}\])"
    member = rf"{STRING}{ws}:{ws}{value}"
    return rf"\{{{ws}({member}({ws},{ws}{member})*)?{ws}\}}"


@lru_cache(maxsize=256)
def _schema_regex(schema_text: str, ws: str | None) -> str:
    return build_regex_from_schema(schema_text, ws)


@lru_cache(maxsize=256)
def _check_syntax(regex: str, param: str) -> None:
    """Refuse a regex outlines-core cannot turn into an automaton (its DFA is built before the
    vocabulary is looked at, so a one-token vocabulary finds syntax errors in microseconds)."""
    try:
        Index(regex, Vocabulary(0, {b"a": [1]}))
    except ValueError as e:
        if str(e).startswith("Failed to build DFA"):
            raise APIError(f"{param} is not a regular expression outlines-core can compile: {e}",
                           param=param) from None
        # Anything else is about the toy vocabulary here; the worker checks against the real one.


def escape(text: str) -> str:
    """``text`` as a literal in outlines-core's regex syntax."""
    return "".join("\\" + c if c in _REGEX_META else c for c in text)


def _schema(value: Any, param: str, ws: str | None = None) -> str:
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as e:
            raise APIError(f"{param} is not valid JSON: {e}", param=param) from None
    if not isinstance(value, dict):
        raise APIError(f"{param} must be a JSON schema object.", param=param)
    try:
        return _schema_regex(json.dumps(value, sort_keys=True), ws)
    except ValueError as e:  # outlines-core names what it cannot express
        raise APIError(f"{param} cannot be used for structured output: {e}", param=param) from None


def _regex(value: Any, param: str) -> str:
    if not isinstance(value, str) or not value:
        raise APIError(f"{param} must be a non-empty string.", param=param)
    _check_syntax(value, param)
    return value


def _choice(choices: Any, param: str) -> str:
    if not isinstance(choices, list) or not choices or not all(isinstance(c, str) and c for c in choices):
        raise APIError(f"{param} must be a non-empty list of non-empty strings.", param=param)
    return "(" + "|".join(escape(c) for c in choices) + ")"


def _from_response_format(rf: Any) -> str | None:
    if not isinstance(rf, dict) or not isinstance(rf.get("type"), str):
        raise APIError('response_format must be an object with a "type".', param="response_format")
    kind = rf["type"]
    if kind == "text":
        return None
    if kind == "json_object":
        return json_object_regex()
    if kind == "json_schema":
        spec = rf.get("json_schema")
        if not isinstance(spec, dict) or "schema" not in spec:
            raise APIError('response_format.json_schema must be an object with a "schema".',
                           param="response_format.json_schema")
        return _schema(spec["schema"], "response_format.json_schema.schema")
    raise APIError(f'response_format.type must be "text", "json_object" or "json_schema", not {kind!r}.',
                   param="response_format.type")


def _from_structured_outputs(so: Any) -> str:
    if not isinstance(so, dict):
        raise APIError("structured_outputs must be an object.", param="structured_outputs")
    for key, value in so.items():
        if key in _SO_UNSUPPORTED and value not in (None, False):
            raise APIError(f"structured_outputs.{key} is not supported by this server; leave it unset.",
                           param=f"structured_outputs.{key}")
        if key not in _SO_KINDS + _SO_UNSUPPORTED + ("disable_any_whitespace", "whitespace_pattern"):
            raise APIError(f"structured_outputs.{key} is not a structured-output option.",
                           param=f"structured_outputs.{key}")
    kinds = [k for k in _SO_KINDS if so.get(k) not in (None, False)]
    if len(kinds) != 1:
        raise APIError(f"structured_outputs must set exactly one of {', '.join(_SO_KINDS)}.",
                       param="structured_outputs")
    ws = so.get("whitespace_pattern")
    if ws is not None:
        ws = _regex(ws, "structured_outputs.whitespace_pattern")
    if so.get("disable_any_whitespace"):
        ws = ""
    kind = kinds[0]
    value, param = so[kind], f"structured_outputs.{kind}"
    if kind == "json":
        return _schema(value, param, ws)
    if kind == "regex":
        return _regex(value, param)
    if kind == "choice":
        return _choice(value, param)
    if value is not True:
        raise APIError(f"{param} must be true or left unset.", param=param)
    return json_object_regex(WHITESPACE if ws is None else ws)


def guide_regex(req: Any) -> str | None:
    """The regex a request's output must match, or None when it sets no structured output.
    Raises APIError naming the field for a malformed or conflicting one."""
    given = {name: getattr(req, name, None) for name in FIELDS}
    if given["response_format"] == {"type": "text"}:
        given["response_format"] = None
    set_ = [name for name, v in given.items() if v is not None]
    if not set_:
        return None
    if len(set_) > 1:
        raise APIError(f"Only one of {', '.join(set_)} may be set.", param=set_[1])
    name = set_[0]
    value = given[name]
    if name == "response_format":
        regex = _from_response_format(value)
    elif name == "guided_json":
        regex = _schema(value, name)
    elif name == "guided_regex":
        regex = _regex(value, name)
    elif name == "guided_choice":
        regex = _choice(value, name)
    else:
        regex = _from_structured_outputs(value)
    if regex is None:
        return None
    if len(regex) > MAX_REGEX_CHARS:
        raise APIError(f"{name} expands to a {len(regex)}-character regular expression; at most "
                       f"{MAX_REGEX_CHARS} are compiled.", param=name)
    # A guide decides when the output ends: it ends at the end of the structure, not past it.
    if getattr(req, "ignore_eos", False):
        raise APIError(f"ignore_eos cannot be combined with {name}: the output ends where the structure does.",
                       param="ignore_eos")
    if getattr(req, "min_tokens", 0):
        raise APIError(f"min_tokens cannot be combined with {name}: the structure decides the length.",
                       param="min_tokens")
    return regex
