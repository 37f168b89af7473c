"""The tests' own shape: they mirror the package, and share helpers only through tests/helpers.

A module's tests live in the file that mirrors its path (``gateway/stages/rules.py`` ->
``tests/stages/test_rules.py``), so a reader finds them without searching; a file for one side of
a module names it after the module (``test_signature_corpus.py``, ``test_base_contract.py``).  The
few modules without a file of their own are named in ``NO_MIRROR`` with the file that tests them.
What several test files need (a running gateway, posting an invoice, waiting for a condition,
partners and certificates) exists once, in ``tests/helpers``; a test file never imports another.
"""

from __future__ import annotations

import ast
import fnmatch
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TESTS = ROOT / "tests"

# Modules without a mirror test file of their own: glob (``*`` crosses folders) -> where they are tested.
NO_MIRROR = {
    "gateway/__init__.py": "a package marker",
    "gateway/*/__init__.py": "package markers",
    "gateway/__main__.py": "`python -m gateway` is the CLI's main (tests/cli/test_main.py)",
    "gateway/storage/sqlite/*.py": "the SQLite backend: tests/storage/test_base_contract.py runs every store method on it",
    "gateway/storage/records.py": "the records the store protocols return: tests/storage/test_base_contract.py",
    "gateway/console/context.py": "a Protocol, no behaviour: the pages' tests (tests/console/) run through it",
}
# Test folders that mirror no package: the console driven by a real browser, the container image
# (Containerfile, container/), and the shared helpers.
OTHER_FOLDERS = {"browser", "container", "helpers"}


def modules() -> list[str]:
    return sorted(p.relative_to(ROOT).as_posix() for p in (ROOT / "gateway").rglob("*.py"))


def mirror(module: str) -> Path:
    """gateway/a/b.py -> tests/a/test_b.py"""
    parts = Path(module).parts[1:]
    return TESTS.joinpath(*parts[:-1], f"test_{parts[-1]}")


def mirrored(module: str) -> bool:
    """tests/a/test_b.py or tests/a/test_b_<side>.py exists."""
    path = mirror(module)
    return path.exists() or any(path.parent.glob(f"{path.stem}_*.py"))


def exempt(module: str) -> str | None:
    return next((reason for pattern, reason in NO_MIRROR.items() if fnmatch.fnmatch(module, pattern)), None)


def test_every_module_has_a_mirror_test_file() -> None:
    missing = [f"{m}: no {mirror(m).relative_to(ROOT)}" for m in modules() if not mirrored(m) and not exempt(m)]
    assert not missing, "write the mirror test file, or name the module in NO_MIRROR with where it is tested:\n" + \
        "\n".join(missing)


def test_the_allowlist_is_short_and_current() -> None:
    assert len(NO_MIRROR) <= 8, "NO_MIRROR is for the exceptions: give modules mirror test files instead"
    for pattern in NO_MIRROR:
        matched = [m for m in modules() if fnmatch.fnmatch(m, pattern)]
        assert matched, f"NO_MIRROR names {pattern}, which matches no module any more"
        assert not all(mirrored(m) for m in matched), f"{pattern} is in NO_MIRROR, but each module it names has a mirror"


def test_test_files_in_a_package_folder_name_their_module() -> None:
    """tests/stages/test_signature_corpus.py is about gateway/stages/signature.py; a file naming no
    module of its package is in the wrong place."""
    stray = []
    for path in sorted(TESTS.rglob("test_*.py")):
        folder = path.parent.relative_to(TESTS)
        if folder == Path(".") or folder.parts[0] in OTHER_FOLDERS:
            continue
        package = ROOT / "gateway" / folder
        stem = path.stem.removeprefix("test_")
        names = {p.stem for p in package.glob("*.py")} if package.is_dir() else set()
        if not any(stem == n or stem.startswith(n + "_") for n in names):
            stray.append(f"{path.relative_to(ROOT)}: no gateway/{folder.as_posix()}/<module>.py it is about")
    assert not stray, "\n".join(stray)


def test_the_mirror_rule() -> None:
    """The mirror rule as the tests above read it (they can fail)."""
    assert mirror("gateway/stages/rules.py") == TESTS / "stages" / "test_rules.py"
    assert mirror("gateway/tls.py") == TESTS / "test_tls.py"
    assert mirrored("gateway/stages/signature.py") and not mirrored("gateway/stages/nothing.py")
    assert exempt("gateway/storage/sqlite/intake.py") and exempt("gateway/stages/__init__.py")
    assert not exempt("gateway/stages/rules.py")


def test_the_import_reader_sees_every_form(tmp_path: Path) -> None:
    path = tmp_path / "test_x.py"
    path.write_text("import tests.helpers\nfrom tests.helpers.daemon import Daemon\nfrom tests.app.test_gateway import post\n"
                    "def f():\n    from tests.conftest import inst\nfrom . import test_y\n")
    assert sorted(foreign_test_imports(path)) == [(3, "tests.app.test_gateway"), (5, "tests.conftest"), (6, ".")]


def foreign_test_imports(path: Path) -> list[tuple[int, str]]:
    """(line, module) for every import of a test module (anything under tests/ but tests/helpers)."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            names = ["." * node.level + (node.module or "")] if node.level else [node.module or ""]
        else:
            continue
        for name in names:
            if name.startswith(".") or (name.split(".")[0] == "tests" and name != "tests"
                                        and not (name == "tests.helpers" or name.startswith("tests.helpers."))):
                found.append((node.lineno, name))
    return found


def test_no_test_file_imports_another() -> None:
    problems = [f"{path.relative_to(ROOT)}:{line} imports {name}"
                for path in sorted(TESTS.rglob("*.py")) if "helpers" not in path.relative_to(TESTS).parts
                for line, name in foreign_test_imports(path)]
    assert not problems, "move what is shared into tests/helpers:\n" + "\n".join(problems)
