"""The import graph against ``docs/design.md``'s layer table: every real arrow between packages is
in the table and every arrow in the table is real; no import cycle between modules (function-level
imports count); no module imports another package's (or another trainer module's) private names."""

from __future__ import annotations

import ast
import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PKG = REPO / "megatron_gvpo"


def _modules() -> dict[str, Path]:
    out = {}
    for f in PKG.rglob("*.py"):
        parts = f.relative_to(REPO).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = f
    return out


def _imports(name: str, path: Path, modules: dict[str, Path]) -> list[tuple[str, list[str]]]:
    """(imported module, names taken from it) for every import of the package in ``path``,
    top-level or inside functions."""
    pkg = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found += [(a.name, []) for a in node.names if a.name.startswith("megatron_gvpo")]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = pkg.split(".")[: len(pkg.split(".")) - node.level + 1]
                base = ".".join(up + ([node.module] if node.module else []))
            if not base.startswith("megatron_gvpo"):
                continue
            for a in node.names:  # ``from pkg import module`` names a module
                sub = f"{base}.{a.name}"
                found.append((sub, []) if sub in modules else (base, [a.name]))
    return found


def _package(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "megatron_gvpo"


def _table() -> dict[str, set[str]]:
    """``docs/design.md``'s layer table: package -> the packages it may import."""
    rows = re.findall(r"^\| `megatron_gvpo/([a-z_]+)(?:/|\.py)` \|.*\| ([^|]+) \|$",
                      (REPO / "docs/design.md").read_text(), re.M)
    assert len(rows) >= 9, "layer table not found in docs/design.md"
    table, above = {}, []
    for pkg, may in rows:
        may = may.strip()
        if may == "everything above":
            table[pkg] = set(above)
        else:
            names = {w.split(" (")[0].strip() for w in may.split(",")}
            table[pkg] = {n for n in names if n in {p for p, _ in rows}}
        above.append(pkg)
    return table


def test_import_arrows_match_the_layer_table():
    modules = _modules()
    real: dict[str, set[str]] = {}
    for name, path in modules.items():
        for target, _ in _imports(name, path, modules):
            a, b = _package(name), _package(target)
            if a != b and a != "megatron_gvpo":
                real.setdefault(a, set()).add(b)
    table = _table()
    for pkg in sorted(set(real) | set(table)):
        missing = real.get(pkg, set()) - table.get(pkg, set())
        extra = table.get(pkg, set()) - real.get(pkg, set())
        assert not missing, f"{pkg} imports {sorted(missing)}: not in docs/design.md's table"
        assert not extra, f"docs/design.md says {pkg} imports {sorted(extra)}: it does not"


def test_no_import_cycle_between_modules():
    modules = _modules()
    graph = {
        n: {t for t, _ in _imports(n, p, modules) if t in modules and t != n}
        for n, p in modules.items()
    }
    # A package's __init__ importing its own submodules is how packages work, not a cycle.
    for n in graph:
        graph[n] = {t for t in graph[n] if not (modules[n].name == "__init__.py"
                                                 and t.startswith(n + "."))}
    state: dict[str, int] = {}

    def visit(n: str, path: list[str]) -> None:
        state[n] = 1
        for t in sorted(graph[n]):
            if state.get(t) == 1:
                cycle = path[path.index(t):] + [t]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if t not in state:
                visit(t, path + [t])
        state[n] = 2

    for n in sorted(graph):
        if n not in state:
            visit(n, [n])


def test_no_module_takes_another_packages_or_drivers_private_names():
    """Across packages, and between the trainer's modules (no driver leans on another's
    internals: what they share lives in ``run.py``, ``actor.py`` and the modules they import)."""
    modules = _modules()
    bad = [
        f"{name} imports {target}.{x}"
        for name, path in modules.items()
        for target, names in _imports(name, path, modules)
        for x in names
        if x.startswith("_") and (_package(name) != _package(target) or _package(name) == "trainer")
    ]
    assert not bad, bad


def test_the_parser_sees_function_level_and_relative_imports(tmp_path):
    """Negative control: imports the graph must not miss."""
    src = tmp_path / "m.py"
    src.write_text("def f():\n    from megatron_gvpo.trainer.loop import Trainer\n"
                   "from .x import _y\n")
    found = _imports("megatron_gvpo.data.m", src, {"megatron_gvpo.trainer.loop": src})
    assert ("megatron_gvpo.trainer.loop", ["Trainer"]) in found
    assert ("megatron_gvpo.data.x", ["_y"]) in found
