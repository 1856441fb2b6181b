"""``dmf config show`` (the effective config: every default filled in, as YAML that ``dmf run``
accepts unchanged) and ``dmf config schema`` (every key with its type, default and description).

The schema is read from the config's own classes (:mod:`dmf.config`): a field's docstring is its
description, so the schema cannot drift from the code.
"""

from __future__ import annotations

import argparse
import json
import types
import typing
from typing import Any

from dmf.cli.common import add_config_arg, config_from_args


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "config",
        help="the effective config of a file, or every config key with its type and default",
        description="Inspect configs: `dmf config show` prints the config a command would run "
        "with, `dmf config schema` documents every key.",
    )
    csub = p.add_subparsers(dest="action", metavar="ACTION", required=True, help="show or schema")
    s = csub.add_parser(
        "show",
        help="print the effective config (defaults filled in, --set applied) as YAML",
        description="Validate CONFIG (with the --set overrides) and print every key of it, "
        "defaults included, as YAML that dmf run accepts unchanged. Relative paths stay "
        "relative to CONFIG's directory; --absolute-paths makes them absolute, so that the "
        "output can be saved anywhere.",
    )
    add_config_arg(s, required=False)
    s.add_argument(
        "--absolute-paths",
        action="store_true",
        help="print the config's paths (store.path, output.model, data.source...) as absolute "
        "paths",
    )
    s.set_defaults(func=cmd_show)

    s = csub.add_parser(
        "schema",
        help="print every config key (dotted) with its type, default and description",
        description="Every key of a config file, as a dotted path (model.rank), with its type "
        "(and bounds), its default and what it does.",
    )
    s.add_argument(
        "--json",
        action="store_true",
        help="print a JSON list of {key, type, default, doc} instead of text",
    )
    s.set_defaults(func=cmd_schema)


# ---------------------------------------------------------------------------------------------
# show
# ---------------------------------------------------------------------------------------------
def cmd_show(args: argparse.Namespace) -> int:
    cfg = config_from_args(args)
    print(show_text(cfg, args.config, absolute_paths=args.absolute_paths), end="")
    return 0


def show_text(cfg, source: str | None = None, absolute_paths: bool = False) -> str:
    """The YAML of ``cfg`` with every key, after a comment saying where relative paths start.

    Loaded back from a file in ``cfg.base_dir`` (or from anywhere, with ``absolute_paths``) it
    gives a config equal to ``cfg``."""
    import yaml

    doc = cfg.to_dict()
    if absolute_paths:
        _absolute(doc, cfg)
    where = f"of {source}" if source else "(no config file: the defaults)"
    head = [f"# dmf config {where}: every key, defaults filled in."]
    if not absolute_paths:
        what = "the config file's directory" if source else "the current directory"
        head.append(f"# Relative paths are relative to {cfg.base_dir} ({what}).")
    body = yaml.safe_dump(doc, sort_keys=False, default_flow_style=False, width=10**6)
    return "\n".join(head) + "\n" + body


def _absolute(doc: dict[str, Any], cfg) -> None:
    """Replace, in the dumped config ``doc``, each relative path of a path key by its absolute
    form (URLs stay as they are)."""
    from dmf.config import PATH_KEYS

    for key in PATH_KEYS:
        *parents, last = key.split(".")
        node: Any = doc
        for part in parents:
            node = node.get(part) if isinstance(node, dict) else None
        if not isinstance(node, dict) or node.get(last) is None:
            continue
        value = node[last]
        if isinstance(value, list):
            node[last] = [cfg.resolve(v) for v in value]
        else:
            node[last] = cfg.resolve(value)


# ---------------------------------------------------------------------------------------------
# schema
# ---------------------------------------------------------------------------------------------
def cmd_schema(args: argparse.Namespace) -> int:
    rows = schema_rows()
    if args.json:
        print(json.dumps(rows, indent=1))
    else:
        print(schema_text(rows), end="")
    return 0


def schema_rows(cls: type | None = None, prefix: str = "") -> list[dict[str, Any]]:
    """Every key of the config class ``cls`` (default: the whole :class:`dmf.config.Config`),
    depth first: ``{key, type, default, doc}`` with the dotted key, a readable type, the
    default as JSON (``"required"`` for a key without one) and the field's description."""
    from pydantic_core import PydanticUndefined

    if cls is None:
        from dmf.config import Config

        cls = Config
    rows = []
    for name, field in cls.model_fields.items():
        if field.exclude:
            continue  # not a key of the file (base_dir)
        key = prefix + name
        default = field.get_default(call_default_factory=True)
        rows.append(
            {
                "key": key,
                "type": type_text(field.annotation) + _bounds(field.metadata),
                "default": "required" if default is PydanticUndefined else _jsonable(default),
                "doc": field.description or "",
            }
        )
        for section in _sections(field.annotation):
            rows.extend(schema_rows(section, key + "."))
    return rows


def schema_text(rows: list[dict[str, Any]]) -> str:
    """The human-readable schema: per key, ``key: type = default`` and the description under
    it, indented."""
    out = []
    for row in rows:
        head = f"{row['key']}: {row['type']}"
        if row["type"] != "section":  # a section's default is its keys' defaults, listed below
            head += f" = {_inline(row['default'])}"
        out.append(head)
        out.extend("    " + line if line else "" for line in row["doc"].splitlines())
        out.append("")
    return "\n".join(out)


def type_text(annotation: Any) -> str:
    """A readable form of a field's type: ``int``, ``str | null``, ``auto | on | off``,
    ``[float, float]``, ``{str: any}``, ``section`` (a nested group of keys)."""
    from pydantic import BaseModel

    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is typing.Annotated:
        return type_text(args[0])
    if annotation is None or annotation is type(None):
        return "null"
    if origin is typing.Literal:
        return " | ".join(str(a) for a in args)
    if origin is typing.Union or origin is types.UnionType:
        return " | ".join(type_text(a) for a in args)
    if origin is list:
        return f"list[{type_text(args[0])}]"
    if origin is tuple:
        return "[" + ", ".join(type_text(a) for a in args) + "]"
    if origin is dict:
        return "{" + f"{type_text(args[0])}: {type_text(args[1])}" + "}"
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return "section"
    if annotation is Any:
        return "any"
    return getattr(annotation, "__name__", str(annotation))


_BOUNDS = (("ge", ">="), ("gt", ">"), ("le", "<="), ("lt", "<"))


def _bounds(metadata: list[Any]) -> str:
    """`` (>= 0, < 1)`` from a field's constraints (annotated_types Ge, Lt...), or ''."""
    parts = [
        f"{sign} {getattr(m, attr)}"
        for m in metadata
        for attr, sign in _BOUNDS
        if getattr(m, attr, None) is not None
    ]
    return f" ({', '.join(parts)})" if parts else ""


def _sections(annotation: Any) -> list[type]:
    """The config classes (sections) in a field's type: its own, or those of a union."""
    from pydantic import BaseModel

    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    return [s for a in typing.get_args(annotation) for s in _sections(a)]


def _jsonable(value: Any) -> Any:
    from pydantic import BaseModel

    if isinstance(value, BaseModel):
        return value.model_dump(mode="json")
    if isinstance(value, tuple):
        return list(value)
    return value


def _inline(value: Any) -> str:
    """``value`` as one line of YAML (``null``, ``auto``, ``[a, b]``, ``{}``)."""
    import yaml

    text = yaml.safe_dump(value, default_flow_style=True, sort_keys=False, width=10**6)
    return text.removesuffix("\n...\n").strip()
