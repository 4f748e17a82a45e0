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


MAX_SPEC_BYTES = 1_000_000  # a spec is a few KB; the paper's is under 20 KB
MAX_DEPTH = 64  # mappings and lists nested in one another
MAX_NODES = 100_000  # values once aliases are expanded (an alias bomb expands exponentially)


def _read_text(path: Path, shown: str) -> str:
    """The file's text, reading at most MAX_SPEC_BYTES + 1 bytes (`/dev/zero` ends too)."""
    try:
        with path.open("rb") as f:
            blob = f.read(MAX_SPEC_BYTES + 1)
    except OSError as e:
        raise UserError(f"{shown}: cannot read the spec file: {e.strerror or e}") from None
    if len(blob) > MAX_SPEC_BYTES:
        raise UserError(
            f"{shown}: larger than {MAX_SPEC_BYTES:,} bytes; a spec is a small text file "
            "(specs/paper.yaml is under 20 KB): name the spec, not a data file"
        )
    try:
        return blob.decode("utf-8")
    except UnicodeDecodeError:
        raise UserError(f"{shown}: not a UTF-8 text file") from None


def _check_nodes(root: yaml.Node, shown: str) -> None:
    """Refuse duplicate keys (at any depth, flow mappings included), nesting deeper than
    MAX_DEPTH and more than MAX_NODES values once aliases are expanded."""
    count = 0

    def where(path: str) -> str:
        return path or "(top level)"

    def walk(node: yaml.Node, path: str, depth: int) -> None:
        nonlocal count
        count += 1
        if count > MAX_NODES:
            raise UserError(
                f"{shown}: {where(path)}: more than {MAX_NODES:,} values once YAML aliases "
                "(*name) are expanded; a spec needs far fewer: write the values out or use "
                "`extends:`"
            )
        if depth > MAX_DEPTH:
            mark = node.start_mark
            raise UserError(
                f"{shown}: line {mark.line + 1}, column {mark.column + 1}: nested deeper than "
                f"{MAX_DEPTH} levels; a spec nests a few levels"
            )
        if isinstance(node, yaml.MappingNode):
            first_line: dict[str, int] = {}
            for key, value in node.value:
                name = key.value if isinstance(key, yaml.ScalarNode) else None
                if name is not None and key.tag != "tag:yaml.org,2002:merge":
                    line = key.start_mark.line + 1
                    if name in first_line:
                        lines = (f"twice on line {line}" if first_line[name] == line
                                 else f"at lines {first_line[name]} and {line}")
                        raise UserError(
                            f"{shown}: {where(path)}: duplicate key '{name}' {lines}; write "
                            "each key once (YAML would silently keep the last one)"
                        )
                    first_line[name] = line
                walk(value, join_path(path, str(name)), depth + 1)
        elif isinstance(node, yaml.SequenceNode):
            for i, item in enumerate(node.value):
                walk(item, join_path(path, i), depth + 1)

    walk(root, "", 0)


def _load(text: str, shown: str) -> Any:
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        _check_nodes(node, shown)
        return loader.construct_document(node)
    except RecursionError:
        raise UserError(
            f"{shown}: nested too deeply for a spec (more than {MAX_DEPTH} levels); "
            "a spec nests a few levels"
        ) from None
    finally:
        loader.dispose()


def read_yaml(path: Path) -> dict[str, Any]:
    """Parse one YAML file safely; errors carry the line and column. Duplicate keys, an
    oversized file, deep nesting and alias bombs are refused before anything is built."""
    shown = display(path)
    if not path.exists():
        raise UserError(f"{shown}: spec file not found", "check the path; specs live in specs/")
    if path.is_dir():
        raise UserError(f"{shown}: is a folder, not a spec file", "name a .yaml file inside it")
    text = _read_text(path, shown)
    try:
        data = _load(text, shown)
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


def resolve_extends(
    path: Path, _chain: tuple[Path, ...] = (), files: list[tuple[str, Any]] | None = None
) -> dict[str, Any]:
    """Read a spec and its `extends:` parents (paths relative to the child file), then apply
    its `overrides:` (a list of `PATH=VALUE`, as for --set) to the merged result. `files`, when
    given, receives (file as shown, its own mapping) for each file, the farthest parent first:
    `origin` tells from it which file wrote a field."""
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
    own = merge({}, raw)  # a copy: merging and overrides write into `merged`
    if parent is None:
        merged = raw
    else:
        merged = merge(_parent(path, parent, _chain, files), raw)
    if files is not None:
        files.append((display(path), own))
    for i, assignment in enumerate(overrides):
        try:
            apply_override(merged, assignment, display(path))
        except UserError as e:
            raise UserError(
                f"{display(path)}: overrides[{i}]: {e.message.removeprefix('--set ')}"
            ) from None
    return merged


def _parent(
    path: Path, parent: Any, _chain: tuple[Path, ...], files: list[tuple[str, Any]] | None
) -> dict[str, Any]:
    if not isinstance(parent, str):
        raise UserError(f"{display(path)}: extends: must be a file path; got {parent!r}")
    parent_path = (path.parent / parent).resolve()
    if not parent_path.exists():
        raise UserError(
            f"{display(path)}: extends: parent spec '{parent}' not found "
            f"(looked for {display(parent_path)})"
        )
    return resolve_extends(parent_path, (*_chain, path), files)


def origin(files: list[tuple[str, Any]], merged: Any, field: str) -> str | None:
    """The file (of `files`, from resolve_extends) that wrote `field` of the merged spec, or the
    closest enclosing field it wrote; None when none did (a default, or --set)."""
    marks: dict[str, str] = {}

    def mark(own: Any, node: Any, where: str, shown: str) -> None:
        if where:
            marks[where] = shown
        if isinstance(own, dict) and isinstance(node, dict):
            for k, v in own.items():
                if k in node:
                    mark(v, node[k], join_path(where, str(k)), shown)
        elif isinstance(own, list) and isinstance(node, list):
            key = _merge_key(own)
            for i, item in enumerate(own):
                j = i
                if key is not None and key == _merge_key(node):
                    j = next((n for n, x in enumerate(node) if x.get(key) == item[key]), -1)
                if 0 <= j < len(node):
                    mark(item, node[j], join_path(where, j), shown)

    for shown, own in files:  # the farthest parent first: a child's mark wins
        mark(own, merged, "", shown)
    probe = field
    while probe:
        if probe in marks:
            return marks[probe]
        probe = re.sub(r"(\.[^.\[\]]+|\[\d+\])$", "", probe) if re.search(
            r"[.\[]", probe) else ""
    return None


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
