"""The house's shape, kept: imports point down the layers, no circles, no private names across modules.

Every import counts, wherever it stands (module top, inside a function, under TYPE_CHECKING): a lazy
import cannot hide a circle.  The layers, bottom first (a module may import its own package and
anything on a lower layer):

    base        errors, model, clock, files, logs, metrics, systemd, tls, vault, devpki, identifiers, ratelimit,
                memory, threads, config/
    stages/     the pure checks
    partners/   the allowlist
    smime/ storage/
    pipeline  delivery/
    inbound/  operations/
    console/
    app/
    cli/
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "gateway"
LAYERS = [
    {"gateway", "errors", "model", "clock", "files", "logs", "metrics", "systemd", "tls", "vault", "devpki", "identifiers",
     "ratelimit", "memory", "threads", "config"},
    {"stages"},
    {"partners"},
    {"smime", "storage"},
    {"pipeline", "delivery"},
    {"inbound", "operations"},
    {"console"},
    {"app"},
    {"cli", "__main__"},  # (__main__ is the cli's)
]


def modules() -> dict[str, Path]:
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def imports(name: str, path: Path, known: dict[str, Path]) -> Iterator[tuple[str, int, list[str]]]:
    """(imported module, line, names taken from it) for every import of a gateway module in ``path``."""
    is_package = path.name == "__init__.py"
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == "gateway":
                    yield alias.name, node.lineno, []
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".") if is_package else name.split(".")[:-1]
                base = base[: len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.split(".")[0] != "gateway":
                continue
            plain = []
            for alias in node.names:  # `from package import module` imports the module
                if f"{target}.{alias.name}" in known:
                    yield f"{target}.{alias.name}", node.lineno, []
                else:
                    plain.append(alias.name)
            if plain or target in known:
                yield target, node.lineno, plain


def layer(module: str) -> tuple[int, str]:
    """(rank, part): the base's modules are one part; elsewhere each package (or top module) is one."""
    parts = module.split(".")
    top = parts[1] if len(parts) > 1 else "gateway"
    top = "cli" if top == "__main__" else top
    for rank, tops in enumerate(LAYERS):
        if top in tops:
            return rank, "base" if rank == 0 else top
    raise AssertionError(f"{module}: in no layer of tests/test_layers.py; put its package in one")


def graph() -> dict[str, dict[str, int]]:
    known = modules()
    return {name: {target: line for target, line, _ in imports(name, path, known) if target != name}
            for name, path in known.items()}


def test_every_module_has_a_layer() -> None:
    for name in modules():
        layer(name)


def test_imports_point_down() -> None:
    problems = []
    for name, targets in graph().items():
        rank, top = layer(name)
        for target, line in targets.items():
            their_rank, their_top = layer(target)
            if their_top != top and their_rank >= rank:
                problems.append(f"{name}:{line} imports {target} ({their_top} is not below {top})")
    assert not problems, "\n".join(problems)


def test_no_import_circles() -> None:
    edges = graph()
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    circles: list[list[str]] = []

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in edges.get(node, {}):
            if state.get(nxt) == 1:
                circles.append(path[path.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt, [*path, nxt])
        state[node] = 2

    for start in sorted(edges):
        if start not in state:
            visit(start, [start])
    assert not circles, "import circles:\n" + "\n".join(" -> ".join(c) for c in circles)


def test_no_private_name_crosses_a_module() -> None:
    known = modules()
    problems = [f"{name}:{line} imports {n} from {target}"
                for name, path in known.items() for target, line, names in imports(name, path, known)
                for n in names if n.startswith("_") and not n.startswith("__") and target != name]
    assert not problems, "\n".join(problems)


def test_the_checks_see_what_they_guard(tmp_path: Path) -> None:
    """The import reader finds a lazy import, a TYPE_CHECKING import and a private name."""
    source = ("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from .web import Console\n"
              "def f():\n    from ..storage.records import _private\n")
    path = tmp_path / "pages.py"
    path.write_text(source)
    known = {"gateway.console.web": path, "gateway.storage.records": path}
    found = {(t, tuple(n)) for t, _, n in imports("gateway.console.pages", path, known)}
    assert found == {("gateway.console.web", ("Console",)), ("gateway.storage.records", ("_private",))}
    assert layer("gateway.console.pages") > layer("gateway.storage.records")


# Foreign modules each used in one place only (ruff's banned-API rules say the same to an editor;
# this also covers the files those rules must exempt).
FENCED = {
    "sqlite3": ("gateway.storage.sqlite.",),
    "cryptography.hazmat": ("gateway.vault", "gateway.tls", "gateway.devpki", "gateway.stages.signature",
                            "gateway.smime.cms"),
}


def test_fenced_modules_stay_in_their_place() -> None:
    problems = []
    for name, path in modules().items():
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            found = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) and not node.level else []
            for module in found:
                for fenced, places in FENCED.items():
                    if (module == fenced or module.startswith(fenced + ".")) and not name.startswith(places):
                        problems.append(f"{name}:{node.lineno} imports {module} (only {', '.join(places)} may)")
    assert not problems, "\n".join(problems)
