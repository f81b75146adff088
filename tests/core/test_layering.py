"""The package's shape: stage packages import only downward, never in a circle, and no module
grows past a few hundred lines. Read from the source with ``ast`` (nothing is imported), so a
function-level import counts as much as a module-level one, and an ``if TYPE_CHECKING:``
import (annotations only) counts for circles: two modules that name each other's types are
one idea split in two."""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

from pilelm.core.stages import COMMANDS, HOOKS

PACKAGE = Path(__file__).resolve().parents[2] / "pilelm"

# Data-flow order: a package may import its own modules and those of lower layers only.
LAYERS = [
    {"core"},
    {"data"},
    {"tokens"},
    {"models"},
    {"training"},
    {"inference"},
    {"evaluation"},
    {"finetune", "retrieval", "compress", "privacy"},
    {"interop"},
    {"serve"},
]
RANK = {pkg: i for i, layer in enumerate(LAYERS) for pkg in layer}
MAX_LINES = 550

# (importing module, imported module) -> why it must stay. Empty is the goal.
ALLOWED_UPWARD: dict[tuple[str, str], str] = {}
# module -> why it may be longer than MAX_LINES. Empty is the goal.
ALLOWED_LONG: dict[str, str] = {}


@dataclass(frozen=True)
class Import:
    importer: str
    imported: str
    line: int
    module_level: bool
    type_only: bool = False
    """Inside ``if TYPE_CHECKING:``: never executed."""


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _target(name: str) -> str:
    """The module an imported name lives in: ``pilelm.serve.ServeConfig`` -> ``pilelm.serve``."""
    while name not in MODULES and "." in name:
        name = name.rsplit(".", 1)[0]
    return name


def _type_checking_only(node: ast.AST) -> bool:
    """``if TYPE_CHECKING:`` (or ``typing.TYPE_CHECKING``) blocks."""
    if not isinstance(node, ast.If):
        return False
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _imports(module: str, path: Path) -> list[Import]:
    tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    out: list[Import] = []

    def visit(node: ast.AST, module_level: bool, type_only: bool = False) -> None:
        for child in ast.iter_child_nodes(node):
            names: list[str] = []
            if isinstance(child, ast.Import):
                names = [a.name for a in child.names]
            elif isinstance(child, ast.ImportFrom):
                base = child.module or ""
                if child.level:  # relative: resolve against this module's package
                    anchor = package.split(".")
                    anchor = anchor[: len(anchor) - (child.level - 1)]
                    base = ".".join([*anchor, base] if base else anchor)
                names = [f"{base}.{a.name}" for a in child.names]
            for name in names:
                if name == "pilelm" or name.startswith("pilelm."):
                    out.append(Import(module, _target(name), child.lineno, module_level and not type_only,
                                      type_only))
            inner = isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda)
            # annotations only: never executed, so no import at run time
            visit(child, module_level and not inner, type_only or _type_checking_only(child))

    visit(tree, True)
    return out


IMPORTS = [imp for module, path in MODULES.items() for imp in _imports(module, path)]


def package_of(module: str) -> str:
    """``pilelm.serve.app`` -> ``serve``; the root modules (``pilelm``, ``pilelm.__main__``) -> ""."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and (PACKAGE / parts[1]).is_dir() else ""


def test_the_walk_sees_the_package():
    # Guards against passing vacuously: the walk found the stage packages and their imports.
    assert {"core", "inference", "evaluation", "serve"} <= {package_of(m) for m in MODULES}
    assert any(i.importer == "pilelm.serve.server" and i.imported == "pilelm.serve.app" for i in IMPORTS)
    assert any(not i.module_level for i in IMPORTS)
    assert any(i.type_only for i in IMPORTS)


def test_every_stage_package_has_a_layer():
    unknown = {package_of(m) for m in MODULES} - set(RANK) - {""}
    assert not unknown, f"packages {sorted(unknown)} have no place in LAYERS: add them in data-flow order"


def test_no_upward_imports():
    upward = []
    for imp in IMPORTS:
        src, dst = package_of(imp.importer), package_of(imp.imported)
        if not src or not dst or src == dst or (imp.importer, imp.imported) in ALLOWED_UPWARD:
            continue
        if RANK[dst] > RANK[src]:
            upward.append(f"{MODULES[imp.importer].relative_to(PACKAGE.parent)}:{imp.line}: "
                          f"{imp.importer} ({src}) imports {imp.imported} ({dst})")
    assert not upward, "imports from a higher layer:\n" + "\n".join(upward)


def test_core_reaches_stages_only_through_the_stage_table():
    # core/cli, core/runner and core/stages name stage modules as strings in COMMANDS; those
    # strings must name real modules.
    for cmd in COMMANDS.values():
        assert _target(cmd.module) == cmd.module, f"{cmd.name}: no module {cmd.module}"
        if cmd.report:
            module, _, func = cmd.report.partition(":")
            assert module in MODULES and func, f"{cmd.name}: report {cmd.report!r} is not module:function"


def _defines(module: str, name: str) -> bool:
    """Whether ``module``'s source defines (or imports) ``name`` at module level."""
    tree = ast.parse(MODULES[module].read_text(encoding="utf-8"))
    for node in tree.body:
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef) and node.name == name:
            return True
        if isinstance(node, ast.Assign | ast.AnnAssign):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            if any(isinstance(t, ast.Name) and t.id == name for t in targets):
                return True
        if isinstance(node, ast.ImportFrom) and any((a.asname or a.name) == name for a in node.names):
            return True
    return False


def test_every_hook_and_report_names_a_real_function():
    # A hook or report section is reached by a string: a rename must not leave it dangling.
    named = [(f"HOOKS[{k!r}]", v) for k, v in HOOKS.items()]
    named += [(f"{c.name} report", c.report) for c in COMMANDS.values() if c.report]
    for where, target in named:
        module, _, attr = target.partition(":")
        assert module in MODULES and _defines(module, attr), f"{where}: {target} names no function"


def _cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one node (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []

    def strongconnect(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in edges.get(v, ()):
            if w not in index:
                strongconnect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for v in sorted(edges):
        if v not in index:
            strongconnect(v)
    return out


def test_no_import_cycle_between_packages():
    edges: dict[str, set[str]] = {}
    for imp in IMPORTS:
        src, dst = package_of(imp.importer), package_of(imp.imported)
        if imp.module_level and src and dst and src != dst:
            edges.setdefault(src, set()).add(dst)
    assert not _cycles(edges), f"module-level import cycles between packages: {_cycles(edges)}"


def test_no_import_cycle_between_modules():
    # Function-level and TYPE_CHECKING imports count too: a lazy import hides a circle from
    # the interpreter, not from the reader.
    edges: dict[str, set[str]] = {}
    for imp in IMPORTS:
        if imp.importer != imp.imported:
            edges.setdefault(imp.importer, set()).add(imp.imported)
    assert not _cycles(edges), f"import cycles between modules: {_cycles(edges)}"


def test_no_module_is_too_long():
    long = {}
    for module, path in MODULES.items():
        n = len(path.read_text(encoding="utf-8").splitlines())
        if n > MAX_LINES and module not in ALLOWED_LONG:
            long[str(path.relative_to(PACKAGE.parent))] = n
    assert not long, f"modules over {MAX_LINES} lines (split them by idea): {long}"
