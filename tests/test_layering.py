"""Package arrows point one way (docs/architecture.md): every import of every module of the four
packages, read with ``ast`` (lazy imports inside functions and ``TYPE_CHECKING`` blocks included).

    videoar_common  <-  data_prep  <-  tokenizer  <-  videoar_megatron

A package imports only packages to its left (and itself); the base, ``videoar_common``, imports the
standard library, torch, yaml and numpy only (plus Megatron's LR scheduler module). No module reaches into another package's private
(``_underscore``) names, by import or by attribute. ``benchmarks/`` and ``tests/`` are outside the rule,
and the library never imports them.
"""
from __future__ import annotations

import ast
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
LAYERS = ("videoar_common", "data_prep", "tokenizer", "videoar_megatron")
"""Lowest first: a package may import itself and the packages before it."""
NEVER_IMPORTED = ("tests", "benchmarks")
BASE_THIRD_PARTY = {"torch", "yaml", "numpy"}
BASE_MODULES = {"megatron.core.optimizer_param_scheduler"}
"""Single third-party modules the base may import: Megatron's LR scheduler (plain Python) is the one
schedule of both trainers (videoar_common.lr_schedule)."""
BASE_OPTIONAL_LAZY = {"wandb", "matplotlib"}
"""Logging / plotting backends that videoar_common.run_logging imports inside the function that uses
them, only when a run asks for them; never at module level."""


@dataclass(frozen=True)
class Import:
    line: int
    target: str
    """The dotted module imported (``import m`` or ``from m import ...``), relative imports resolved."""
    names: tuple[str, ...]
    """Names taken by ``from m import a, b``; empty for ``import m``."""
    lazy: bool
    """Inside a function (imported when called)."""


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _resolve(node: ast.ImportFrom, module: str, is_package: bool) -> str:
    if node.level == 0:
        return node.module or ""
    base = module.split(".") if is_package else module.split(".")[:-1]
    base = base[:len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def imports_of(source: str, module: str, is_package: bool) -> list[Import]:
    out: list[Import] = []

    def visit(node: ast.AST, lazy: bool) -> None:
        for child in ast.iter_child_nodes(node):
            inner = lazy or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef))
            if isinstance(child, ast.Import):
                out.extend(Import(child.lineno, a.name, (), lazy) for a in child.names)
            elif isinstance(child, ast.ImportFrom):
                names = tuple(a.name for a in child.names)
                out.append(Import(child.lineno, _resolve(child, module, is_package), names, lazy))
            visit(child, inner)

    visit(ast.parse(source), False)
    return out


def _top(dotted: str) -> str:
    return dotted.split(".")[0]


def _private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def import_violations(source: str, module: str, is_package: bool = False) -> list[str]:
    """What ``source`` (the module ``module``) imports against the arrows, one line per offence."""
    own = _top(module)
    allowed = LAYERS[:LAYERS.index(own) + 1]
    bad = []
    for imp in imports_of(source, module, is_package):
        top = _top(imp.target)
        where = f"{module}:{imp.line}"
        spelled = f"from {imp.target} import {', '.join(imp.names)}" if imp.names else f"import {imp.target}"
        if top in NEVER_IMPORTED:
            bad.append(f"{where}: `{spelled}`: the library never imports {top}/")
        elif top in LAYERS and top not in allowed:
            bad.append(f"{where}: `{spelled}`: {own} may import only {', '.join(allowed)} "
                       f"(arrows: {' <- '.join(LAYERS)})")
        elif own == "videoar_common" and top not in LAYERS and top not in sys.stdlib_module_names \
                and top not in BASE_THIRD_PARTY and imp.target not in BASE_MODULES and not (imp.lazy and top in BASE_OPTIONAL_LAZY):
            bad.append(f"{where}: `{spelled}`: the base package imports the standard library, "
                       f"{', '.join(sorted(BASE_THIRD_PARTY))} only")
        if top in LAYERS and top != own:
            private = [p for p in imp.target.split(".") if _private(p)] + [n for n in imp.names if _private(n)]
            if private:
                bad.append(f"{where}: `{spelled}`: {', '.join(private)} is private to {top}")
    return bad + _private_attribute_uses(source, module, is_package)


def _private_attribute_uses(source: str, module: str, is_package: bool) -> list[str]:
    """``alias._name`` where ``alias`` was imported from another of the packages."""
    own, tree = _top(module), ast.parse(source)
    foreign: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            foreign |= {(a.asname or a.name.split(".")[0]) for a in node.names
                        if _top(a.name) in LAYERS and _top(a.name) != own}
        elif isinstance(node, ast.ImportFrom):
            target = _resolve(node, module, is_package)
            if _top(target) in LAYERS and _top(target) != own:
                foreign |= {a.asname or a.name for a in node.names}
    bad = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and _private(node.attr):
            root = node.value
            while isinstance(root, ast.Attribute):
                root = root.value
            if isinstance(root, ast.Name) and root.id in foreign:
                bad.append(f"{module}:{node.lineno}: `{ast.unparse(node)}`: private name of another package")
    return bad


def package_modules() -> list[tuple[Path, str]]:
    return [(p, module_name(p, REPO)) for pkg in LAYERS for p in sorted((REPO / pkg).rglob("*.py"))]


def test_every_package_has_modules():
    found = {_top(m) for _, m in package_modules()}
    assert found == set(LAYERS)


@pytest.mark.parametrize("package", LAYERS)
def test_imports_follow_the_package_arrows(package):
    bad = [v for path, module in package_modules() if _top(module) == package
           for v in import_violations(path.read_text(), module, path.name == "__init__.py")]
    assert not bad, "imports against the package layering (docs/architecture.md):\n" + "\n".join(bad)


# The checker itself, on sources written for it: each rule must be able to fail.

def test_checker_catches_an_upward_import_lazy_relative_or_private():
    assert import_violations("import tokenizer\n", "data_prep.x")[0].startswith("data_prep.x:1: `import tokenizer`")
    lazy = "def f():\n    from videoar_megatron.evaluation import recon\n"
    assert "tokenizer may import only" in import_violations(lazy, "tokenizer.evaluate")[0]
    assert import_violations("from . import shards\n", "data_prep.pretokenize.writer") == []
    assert import_violations("from .. import shards\n", "data_prep.pretokenize.writer") == []
    assert import_violations("from ..x import y\n", "tokenizer.a.b") == []
    assert "is private to videoar_common" in import_violations(
        "from videoar_common.atomic import _fsync_dir\n", "data_prep.x")[0]
    assert "is private to videoar_megatron" in import_violations(
        "from videoar_megatron.cli._recipe_args import load_recipe\n", "tokenizer.x")[-1]
    assert import_violations("from videoar_megatron.cli._recipe_args import load_recipe\n",
                             "videoar_megatron.cli.x") == []  # inside its own package
    assert "private name of another package" in import_violations(
        "from videoar_common import atomic\natomic._fsync_dir(p)\n", "data_prep.x")[0]
    assert "the library never imports tests/" in import_violations("from tests import helpers\n", "data_prep.x")[0]


def test_checker_keeps_the_base_package_small():
    assert import_violations("import os, torch, yaml, numpy as np\n", "videoar_common.x") == []
    assert "standard library" in import_violations("import einops\n", "videoar_common.x")[0]
    assert "standard library" in import_violations("import wandb\n", "videoar_common.x")[0]
    assert import_violations("def f():\n    import wandb\n", "videoar_common.x") == []
    assert "videoar_common may import only videoar_common" in import_violations(
        "from data_prep import shards\n", "videoar_common.x")[0]
