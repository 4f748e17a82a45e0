"""Reading a spec: safe YAML, `extends:` (inherit a parent spec), `overrides:` and `--set`.

    raw = resolve_extends(Path("specs/demo.yaml"))        # one plain dict, parents merged in
    apply_override(raw, "models.cnn.train.epochs=3", ...)  # as `--set` does

Everything here works on plain dicts, before validation: harness.spec.load_spec calls it, then
validates the result against harness.spec.schema. A spec is plain data (mappings, lists,
strings, numbers); YAML tags that build objects are refused. Bad input raises `UserError` with
one line naming the file, the field path, what was found and what is allowed.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml

from harness.errors import UserError


def display(path: Path) -> str:
    """A path as messages show it: relative to the working directory when inside it."""
    try:
        return str(path.resolve().relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def read_yaml(path: Path) -> dict[str, Any]:
    """Parse one YAML file safely; errors carry the line and column."""
    shown = display(path)
    if not path.exists():
        raise UserError(f"{shown}: spec file not found", "check the path; specs live in specs/")
    if path.is_dir():
        raise UserError(f"{shown}: is a folder, not a spec file", "name a .yaml file inside it")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark
        where = f"line {mark.line + 1}, column {mark.column + 1}" if mark else "unknown position"
        tag = re.search(r"tag '(?:tag:yaml\.org,2002:)?([^']*)'", e.problem or "")
        if isinstance(e, yaml.constructor.ConstructorError) and tag:
            shown_tag = tag.group(1) if tag.group(1).startswith("!") else f"!!{tag.group(1)}"
            raise UserError(
                f"{shown}: invalid YAML at {where}: tag '{shown_tag}' is not allowed",
                "a spec holds plain data (mappings, lists, strings, numbers), never objects",
            ) from None
        raise UserError(f"{shown}: invalid YAML at {where}: {e.problem}") from None
    except yaml.YAMLError as e:
        raise UserError(f"{shown}: invalid YAML: {e}") from None
    except UnicodeDecodeError:
        raise UserError(f"{shown}: not a UTF-8 text file") from None
    except OSError as e:
        raise UserError(f"{shown}: cannot read the spec file: {e.strerror or e}") from None
    if data is None:
        raise UserError(f"{shown}: the spec is empty")
    if not isinstance(data, dict):
        raise UserError(f"{shown}: the top level must be a mapping; got {type(data).__name__}")
    return data


MERGE_KEYS = ("name", "what")  # models merge by name, assumptions by what


def _merge_key(v: Any) -> str | None:
    if not isinstance(v, list) or not v:
        return None
    for k in MERGE_KEYS:
        if all(isinstance(x, dict) and k in x for x in v):
            return k
    return None


def merge(base: Any, over: Any) -> Any:
    """Deep merge for `extends`: mappings merge, lists of mappings keyed by `name` (models) or
    `what` (assumptions) merge item by item, other lists and scalars are replaced. `null` in the
    child deletes a key whose parent value is a mapping or list (back to the default)."""
    if isinstance(base, dict) and isinstance(over, dict):
        out = dict(base)
        for k, v in over.items():
            if v is None and k in out and isinstance(out[k], dict | list):
                del out[k]
            else:
                out[k] = merge(out[k], v) if k in out else v
        return out
    key = _merge_key(base)
    if key is not None and key == _merge_key(over):
        out_list = [dict(x) for x in base]
        index = {x[key]: i for i, x in enumerate(out_list)}
        for item in over:
            if item[key] in index:
                out_list[index[item[key]]] = merge(out_list[index[item[key]]], item)
            else:
                out_list.append(item)
        return out_list
    return over


def resolve_extends(path: Path, _chain: tuple[Path, ...] = ()) -> dict[str, Any]:
    """Read a spec and its `extends:` parents (paths relative to the child file), then apply
    its `overrides:` (a list of `PATH=VALUE`, as for --set) to the merged result."""
    path = path.resolve() if path.exists() else path
    if path in _chain:
        cycle = " -> ".join(display(p) for p in (*_chain, path))
        raise UserError(f"{display(_chain[-1])}: extends: cycle: {cycle}")
    raw = read_yaml(path)
    parent = raw.pop("extends", None)
    overrides = raw.pop("overrides", [])
    if not isinstance(overrides, list) or not all(isinstance(o, str) for o in overrides):
        raise UserError(
            f"{display(path)}: overrides: must be a list of 'PATH=VALUE' strings "
            f"(as for --set); got {overrides!r}"
        )
    if parent is None:
        merged = raw
    else:
        merged = merge(_parent(path, parent, _chain), raw)
    for i, assignment in enumerate(overrides):
        try:
            apply_override(merged, assignment, display(path))
        except UserError as e:
            raise UserError(
                f"{display(path)}: overrides[{i}]: {e.message.removeprefix('--set ')}"
            ) from None
    return merged


def _parent(path: Path, parent: Any, _chain: tuple[Path, ...]) -> dict[str, Any]:
    if not isinstance(parent, str):
        raise UserError(f"{display(path)}: extends: must be a file path; got {parent!r}")
    parent_path = (path.parent / parent).resolve()
    if not parent_path.exists():
        raise UserError(
            f"{display(path)}: extends: parent spec '{parent}' not found "
            f"(looked for {display(parent_path)})"
        )
    return resolve_extends(parent_path, (*_chain, path))


_SEGMENT = re.compile(r"([^.\[\]]+)|\[(\d+)\]")


def split_path(dotted: str) -> list[str | int]:
    """`models.cnn.layers[3].rate` or `models.1.train.epochs` -> segments."""
    parts: list[str | int] = []
    for name, index in _SEGMENT.findall(dotted):
        if index:
            parts.append(int(index))
        elif name.isdigit():
            parts.append(int(name))
        else:
            parts.append(name)
    return parts


def join_path(path: str, seg: str | int) -> str:
    """`models[1]` + `train` -> `models[1].train`; an int segment is an index: `layers[3]`."""
    if isinstance(seg, int):
        return f"{path}[{seg}]"
    return f"{path}.{seg}" if path else seg


def apply_override(raw: dict[str, Any], assignment: str, source: str) -> str:
    """Apply one `--set path=value`; the value is parsed as a YAML scalar or flow collection.

    Returns the path it set as validation messages write it (`models[1].train.epochs`).
    """
    if "=" not in assignment:
        raise UserError(
            f"--set {assignment}: expected PATH=VALUE, e.g. --set models.cnn.train.epochs=3"
        )
    dotted, text = assignment.split("=", 1)
    try:
        value = yaml.safe_load(text) if text.strip() else ""
    except yaml.YAMLError:
        value = text
    segments = split_path(dotted.strip())
    if not segments:
        raise UserError(f"--set {assignment}: empty path")
    node: Any = raw
    walked = ""  # as the user wrote it, for messages
    resolved = ""  # with names resolved to indices, as validation messages write it
    for i, seg in enumerate(segments):
        last = i == len(segments) - 1
        where = walked or "the top level"
        shown = seg if isinstance(seg, str) else f"[{seg}]"  # before a name becomes an index
        if isinstance(node, list):
            if isinstance(seg, str):
                matches = [x for x in node if isinstance(x, dict) and x.get("name") == seg]
                if not matches:
                    names = [str(x["name"]) for x in node if isinstance(x, dict) and "name" in x]
                    raise UserError(
                        f"--set {dotted}: {where} has no item named '{seg}'; "
                        f"named items: {', '.join(names) or 'none'}"
                    )
                seg = node.index(matches[0])
            if not 0 <= seg < len(node):
                raise UserError(f"--set {dotted}: {where} has {len(node)} items; got index {seg}")
        elif isinstance(node, dict):
            if isinstance(seg, int):
                raise UserError(f"--set {dotted}: {where} is a mapping; got index [{seg}]")
            if seg not in node and not last:
                node[seg] = {}  # a section left to its defaults; validation checks the key
        else:
            raise UserError(f"--set {dotted}: {where} is a value, it has no field '{shown}'")
        if last:
            node[seg] = value
        else:
            node = node[seg]
        walked = f"{walked}{shown}" if shown.startswith("[") else join_path(walked, shown)
        resolved = join_path(resolved, seg)
    del source
    return resolved
