"""`rlhf-image <command> --help`: the stage's own options, read from the source of its dataclasses.

Importing a stage pulls in torch, diffusers, transformers and trl (seconds), and `HfArgumentParser`'s help lists
every `transformers.TrainingArguments` field (hundreds of lines). This help reads the stage module and the
dataclasses of its `ARGUMENTS` with `ast` instead: it answers in a fraction of a second and shows the recipe's
argument groups and the trainer config's own fields; `--help-all` still prints the full parser help.
"""

from __future__ import annotations

import ast
import functools
import importlib.machinery
import sys
import textwrap
from dataclasses import dataclass

# Classes outside the library whose fields are summarised in one line rather than listed.
EXTERNAL_BASES = {"TrainingArguments": "transformers.TrainingArguments"}


@dataclass
class FieldHelp:
    name: str
    default: str
    help: str


@functools.cache
def _spec(module: str) -> importlib.machinery.ModuleSpec:
    """Where `module` lives, found by the import system's finders without executing it or its parent packages
    (`importlib.util.find_spec` would import `rlhf_image.rollout` and with it Ray)."""
    parent = module.rpartition(".")[0]
    path = _spec(parent).submodule_search_locations if parent else None
    for finder in sys.meta_path:
        spec = finder.find_spec(module, path) if hasattr(finder, "find_spec") else None
        if spec is not None:
            return spec
    raise ModuleNotFoundError(module)


def _module_source(module: str) -> tuple[ast.Module, str]:
    spec = _spec(module)
    if spec.origin is None:
        raise ModuleNotFoundError(module)
    with open(spec.origin, encoding="utf-8") as f:
        return ast.parse(f.read()), module


def _package_of(module: str, tree_is_package: bool) -> str:
    return module if tree_is_package else module.rpartition(".")[0]


def _resolve(name: str, tree: ast.Module, module: str) -> tuple[ast.ClassDef | None, str | None]:
    """The class `name` as seen from `module`: defined there, imported there, or exported lazily by an `_EXPORTS`
    table (`rlhf_image`'s top level). Returns `(None, dotted name)` for classes outside the library."""
    for node in tree.body:
        if isinstance(node, ast.ClassDef) and node.name == name:
            return node, module
    is_package = (_spec(module).origin or "").endswith("__init__.py")
    for node in tree.body:
        if isinstance(node, ast.ImportFrom) and any((a.asname or a.name) == name for a in node.names):
            original = next(a.name for a in node.names if (a.asname or a.name) == name)
            source = node.module or ""
            if node.level:
                base = _package_of(module, is_package).split(".")
                base = base[:len(base) - node.level + 1]
                source = ".".join([*base, *([source] if source else [])])
            if not source.startswith("rlhf_image"):
                return None, f"{source}.{original}"
            return _resolve(original, *_module_source(source))
        if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == "_EXPORTS" for t in node.targets):
            table = ast.literal_eval(node.value)
            if name in table:
                return _resolve(name, *_module_source(f"{module}.{table[name]}"))
    return None, name


def _constants(tree: ast.Module, module: str = "", follow_imports: bool = True) -> dict:
    """Module-level names bound to literals (the tuples some help strings format, constant defaults), including
    those imported from the library's own modules."""
    out = {}
    for node in tree.body:
        if follow_imports and isinstance(node, ast.ImportFrom) and (node.module or "").startswith("rlhf_image"):
            try:
                imported = _constants(*_module_source(node.module), follow_imports=False)
            except ModuleNotFoundError:
                continue
            out.update({a.asname or a.name: imported[a.name] for a in node.names if a.name in imported})
        if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
            try:
                out[node.targets[0].id] = ast.literal_eval(node.value)
            except ValueError:
                pass
    return out


def _text(node: ast.expr, constants: dict) -> str:
    """A help string: a literal, or an f-string over the module's literal constants (else its source)."""
    try:
        return ast.literal_eval(node)
    except ValueError:
        pass
    try:
        return str(eval(compile(ast.Expression(node), "<help>", "eval"), {"__builtins__": {"list": list}},
                        dict(constants)))
    except Exception:  # a name this help cannot see: show the expression as written
        return ast.unparse(node).removeprefix("f").strip("'\"")


def _fields(cls: ast.ClassDef, constants: dict) -> list[FieldHelp]:
    out = []
    for node in cls.body:
        if not isinstance(node, ast.AnnAssign) or not isinstance(node.target, ast.Name):
            continue
        if ast.unparse(node.annotation).startswith("ClassVar"):  # class constants, not options
            continue
        default, help_text = "" if node.value is None else ast.unparse(node.value), ""
        value = node.value
        if isinstance(value, ast.Call) and getattr(value.func, "id", None) == "field":
            default = ""
            for keyword in value.keywords:
                if keyword.arg == "default":
                    default = repr(constants[keyword.value.id]) if isinstance(keyword.value, ast.Name) and \
                        keyword.value.id in constants else ast.unparse(keyword.value)
                elif keyword.arg == "default_factory":
                    factory = keyword.value
                    default = ast.unparse(factory.body) if isinstance(factory, ast.Lambda) else \
                        ast.unparse(factory) + "()"
                elif keyword.arg == "metadata" and isinstance(keyword.value, ast.Dict):
                    for key, item in zip(keyword.value.keys, keyword.value.values):
                        if isinstance(key, ast.Constant) and key.value == "help":
                            help_text = _text(item, constants)
        out.append(FieldHelp(node.target.id, default, help_text))
    return out


def _class_chain(name: str, tree: ast.Module, module: str) -> tuple[list[tuple[str, list[FieldHelp]]], list[str]]:
    """`[(class name, its own fields)]` from `name` up through its bases inside the library, and the names of
    the external bases reached (e.g. `transformers.TrainingArguments`)."""
    cls, where = _resolve(name, tree, module)
    if cls is None:
        return [], [where]
    defining_tree, defining_module = _module_source(where)
    groups, external = [(cls.name, _fields(cls, _constants(defining_tree, defining_module)))], []
    for base in cls.bases:
        if isinstance(base, ast.Name):
            more, ext = _class_chain(base.id, defining_tree, defining_module)
            groups += more
            external += ext
    return groups, external


def _first_paragraph(cls_doc: str | None) -> str:
    return " ".join((cls_doc or "").strip().split("\n\n")[0].split())


def stage_help(command: str, module: str) -> str:
    """The help of one command: usage, `--config`, then each argument group's own fields with default and help."""
    tree, _ = _module_source(module)
    arguments = next(node.value for node in tree.body if isinstance(node, ast.Assign)
                     and any(isinstance(t, ast.Name) and t.id == "ARGUMENTS" for t in node.targets))
    names = [element.id for element in arguments.elts]
    width = 100
    config_help = textwrap.wrap("YAML file (or the name of a packaged config) that sets any field below by name; "
                                "flags override it", width - 34)
    lines = [f"usage: rlhf-image {command} --config <stage.yaml> [--field value ...]", "",
             "  --config CONFIG".ljust(34) + config_help[0], *[" " * 34 + part for part in config_help[1:]], ""]
    external: list[str] = []
    for name in names:
        groups, ext = _class_chain(name, tree, module)
        external += ext
        for group_name, fields in groups:
            cls, _ = _resolve(group_name, tree, module)
            summary = _first_paragraph(ast.get_docstring(cls)) if cls is not None else ""
            lines += textwrap.wrap(f"{group_name}: {summary}" if summary else f"{group_name}:", width)
            for f in fields:
                flag = f"  --{f.name}"
                text = f"{f.help} (default: {f.default})" if f.help else f"(default: {f.default})"
                wrapped = textwrap.wrap(text, width - 34) or [""]
                if len(flag) > 32:  # too long for the flag column: help on the next lines
                    lines.append(flag)
                    lines += [" " * 34 + part for part in wrapped]
                else:
                    lines.append(flag.ljust(34) + wrapped[0])
                    lines += [" " * 34 + part for part in wrapped[1:]]
            lines.append("")
    for name in dict.fromkeys(external):
        short = name.rpartition(".")[2]
        label = EXTERNAL_BASES.get(short, name)
        lines += textwrap.wrap(f"Every {label} field is accepted too (output_dir, learning_rate, max_steps, bf16, "
                               f"deepspeed, save_steps, report_to, ...): `rlhf-image {command} --help-all` lists "
                               "them all.", width)
    return "\n".join(lines).rstrip() + "\n"
