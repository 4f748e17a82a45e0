"""Error messages for a spec that fails validation: one line per error, in the spec's own terms.

    message = validation_message(error, raw, "specs/paper.yaml")
    # "specs/paper.yaml: models[1].layers[4]: unknown layer type 'conv3d'; allowed: conv2d, ..."

pydantic reports a location such as ('models', 1, 'sequential', 'layers', 4) and a message such
as "Input should be ..."; this module turns the location into the path the user wrote
(`models[1].layers[4]`, union tags dropped), the message into "must ...; got <value>", lists the
allowed names of a closed set (from harness.vocab), and tells which `--set` assignment an error
comes from (`from_override`).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

from pydantic import ValidationError

from harness.spec.resolve import join_path
from harness.vocab import CATEGORIES, CATEGORY_NAMES


def _loc_to_path(loc: Sequence[int | str], raw: Any) -> str:
    """Turn a pydantic error location into a spec path, dropping union tags."""
    out = ""
    node = raw
    for part in loc:
        if isinstance(node, list) and isinstance(part, int):
            out += f"[{part}]"
            node = node[part] if part < len(node) else None
        elif isinstance(node, dict) and part in node:
            out += f".{part}" if out else str(part)
            node = node[part]
        elif isinstance(node, dict) and isinstance(part, str) and node.get("type") != part \
                and node.get("kind") != part and node.get("name") != part:
            out += f".{part}" if out else str(part)
            node = None
        # else: a discriminator tag (layer type, model kind, optimizer name): not a path step
    return out or "(top level)"


def _short(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


# a discriminated union's tag field -> how to name one of its values, and the allowed ones
_ALLOWED_BY_TAG = {
    tag: (CATEGORY_NAMES[category], CATEGORIES[category])
    for tag, category in (("type", "layers"), ("kind", "kinds"), ("name", "optimizers"))
}


def _tagged(err: dict[str, Any]) -> tuple[str, tuple[str, ...]]:
    """(what a tagged union's member is called, the tags allowed): a field named by its key
    (`schedule`, `optimizer`) is called so, with the union's own tags."""
    ctx = err.get("ctx") or {}
    what, allowed = _ALLOWED_BY_TAG.get(str(ctx.get("discriminator", "")).strip("'"),
                                        ("value", ()))
    loc = err.get("loc") or ()
    if loc and isinstance(loc[-1], str):
        what = loc[-1]
    expected = ctx.get("expected_tags")
    if isinstance(expected, str) and expected:
        tags = tuple(t.strip().strip("'") for t in expected.split(","))
        if set(tags) != set(allowed):  # another union than the vocabulary's (e.g. schedules)
            allowed = tags
    return what, allowed


def _describe(err: dict[str, Any]) -> str:
    kind = err["type"]
    ctx = err.get("ctx") or {}
    got = err.get("input")
    if kind in ("unknown_key", "bool_for_number"):
        return str(err["msg"])
    if kind in ("cross_ref", "dataset_field"):
        return str(err["msg"]).split(": ", 1)[1]
    if kind in ("model_type", "model_attributes_type", "dict_type"):
        return f"must be a mapping (key: value); got {_short(got)}"
    if kind in ("tuple_type", "list_type"):
        return f"must be a list; got {_short(got)}"
    if kind == "union_tag_invalid":
        what, allowed = _tagged(err)
        return f"unknown {what} {ctx.get('tag')!r}; allowed: {', '.join(allowed)}"
    if kind == "union_tag_not_found":
        disc = str(ctx.get("discriminator", "")).strip("'")
        what, allowed = _tagged(err)
        return f"missing '{disc}' ({what}); allowed: {', '.join(allowed)}"
    if kind == "literal_error":
        expected = str(ctx.get("expected", "")).replace("'", "").replace(" or ", ", ")
        return f"must be one of {expected}; got {_short(got)}"
    if kind == "missing":
        return "required field is missing"
    if kind == "value_error":
        return str(ctx.get("error", err["msg"]))
    if kind == "too_short" and isinstance(got, list | tuple) and not got:
        return "must not be empty"
    msg = str(err["msg"])
    msg = re.sub(r"^(Input|String|List|Tuple|Dictionary|Value) should ", "must ", msg)
    msg = re.sub(r"^Value error, ", "", msg)
    return f"{msg}; got {_short(got)}"


def _error_path(err: dict[str, Any], raw: dict[str, Any]) -> str:
    ctx = err.get("ctx") or {}
    if err["type"] in ("cross_ref", "dataset_field"):
        return str(ctx["path"])
    where = _loc_to_path(err["loc"], raw)
    if err["type"] == "bool_for_number":  # raised by the mapping, about one of its fields
        return join_path("" if where == "(top level)" else where, str(ctx["field"]))
    return where


def error_field(err: dict[str, Any], raw: dict[str, Any]) -> str:
    """The field an error is about: the path, or for an unknown key or tag the key itself."""
    where = _error_path(err, raw)
    where = "" if where == "(top level)" else where
    ctx = err.get("ctx") or {}
    if err["type"] in ("unknown_key", "union_tag_invalid"):
        return join_path(where, str(ctx.get("key") or ctx.get("discriminator", "")).strip("'"))
    return where


MAX_ERRORS = 10  # reported at once; a spec with more is probably not this kind of file at all


def error_description(err: dict[str, Any]) -> str:
    """What is wrong, without the file and the path."""
    return _describe(err)


def validation_message(err: dict[str, Any], raw: dict[str, Any], source: str) -> str:
    """One error's line: `source: path: what is wrong`."""
    return f"{source}: {_error_path(err, raw)}: {_describe(err)}"


def validation_errors(e: ValidationError) -> list[dict[str, Any]]:
    """The errors of one validation, in the order pydantic found them (all of them: the user
    fixes every one in one edit, not one per attempt)."""
    return [dict(err) for err in e.errors(include_url=False)]


def _within(path: str, ancestor: str) -> bool:
    return path == ancestor or path.startswith((f"{ancestor}.", f"{ancestor}["))


def from_override(
    err: dict[str, Any], raw: dict[str, Any], set_paths: dict[str, str]
) -> str | None:
    """The `--set` assignment an error comes from, if any."""
    where = _error_path(err, raw)
    where = "" if where == "(top level)" else where
    ctx = err.get("ctx") or {}
    if err["type"] in ("unknown_key", "union_tag_invalid"):  # about one key of the mapping
        key = join_path(where, str(ctx.get("key") or ctx.get("discriminator", "")).strip("'"))
        return next((a for p, a in set_paths.items() if _within(p, key)), None)
    for p, a in set_paths.items():
        if where and _within(where, p):  # at or inside the overridden value
            return a
        if err["type"] == "value_error" and _within(p, where):  # a check across sibling fields
            return a
    return None
