"""Lint is part of the suite: it enforces the banned APIs (stdlib XML parsers, crypto primitives
outside vault/tls/devpki) as well as style."""

import ast
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def test_ruff_passes():
    ruff = shutil.which("ruff") or str(Path(sys.executable).with_name("ruff"))
    if not Path(ruff).exists():
        pytest.skip("ruff is not installed (it comes with the test extras)")
    result = subprocess.run([ruff, "check", "gateway", "benchmarks", "tests"], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_no_text_attribute_on_parsed_trees():
    """SECURITY-TESTS.md S-06: values are read as XPath string values; `.text` would stop at a comment."""
    for src in (ROOT / "gateway").rglob("*.py"):
        if src.name == "signature.py":  # builds and cuts trees (enveloped transform); reads no business value
            continue
        tree = ast.parse(src.read_text(), str(src))
        uses = [n.lineno for n in ast.walk(tree)
                if isinstance(n, ast.Attribute) and n.attr in ("text", "tail") and isinstance(n.ctx, ast.Load)]
        assert not uses, f"{src.relative_to(ROOT)} reads .text/.tail at lines {uses}"


def test_mypy_strict_passes():
    pytest.importorskip("mypy", reason="mypy comes with the test extras")
    result = subprocess.run([sys.executable, "-m", "mypy", "gateway"], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
