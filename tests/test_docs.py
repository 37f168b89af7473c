"""The README, docs/, the example configuration and CI must say what the code does."""

import re
import subprocess
from pathlib import Path

from gateway.operations.instance import PRODUCTION_EXAMPLE, render_config

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text(encoding="utf-8")
DOCS = ROOT / "docs"
PARTNERS = (DOCS / "partners.md").read_text(encoding="utf-8")
DEVELOPMENT = (DOCS / "development.md").read_text(encoding="utf-8")


def test_config_example_is_the_rendered_template():
    assert (ROOT / "config" / "einvoice-gateway.toml").read_text() == render_config(**PRODUCTION_EXAMPLE)


def test_ci_runs_the_readme_test_command():
    command = (ROOT / ".ci" / "run").read_text().strip().splitlines()[-1]
    assert f"\n{command}\n" in README


def test_every_error_code_is_documented():
    codes = set()
    for src in (ROOT / "gateway").rglob("*.py"):
        codes |= set(re.findall(r'code="([A-Z_]+)"', src.read_text()))
    handshake = ROOT / "gateway" / "inbound" / "handshake.py"  # TLS failure reasons: metric labels, not replies
    for src in [ROOT / "gateway" / "errors.py", *(ROOT / "gateway" / "inbound").glob("*.py")]:
        if src != handshake:
            codes |= set(re.findall(r'"([A-Z][A-Z_]{3,}[A-Z])"', src.read_text()))
    assert {"MALFORMED_XML", "OVERLOADED", "NOT_FOUND"} <= codes, "the patterns are stale"
    missing = sorted(c for c in codes if f"`{c}`" not in PARTNERS)
    assert not missing, f"error codes missing from docs/partners.md: {missing}"


def test_every_handshake_failure_reason_is_documented():
    reasons = set(re.findall(r'"([A-Z][A-Z_]{3,}[A-Z])"', (ROOT / "gateway" / "inbound" / "handshake.py").read_text()))
    assert {"HANDSHAKE_TIMEOUT", "CONNECTION_LOST"} <= reasons, "the pattern is stale"
    operators = (DOCS / "operators.md").read_text(encoding="utf-8")
    missing = sorted(r for r in reasons if f"`{r}`" not in operators)
    assert not missing, f"TLS handshake failure reasons missing from docs/operators.md (Monitoring): {missing}"


def readme_map() -> dict[str, str]:
    """The package map under "## Development": name (``errors.py``, ``stages/``) -> its one line."""
    section = DEVELOPMENT[DEVELOPMENT.index("\n## Development\n"):]
    block = section[section.index("```\ngateway/\n") + len("```\ngateway/\n"):]
    block = block[:block.index("```")]
    entries = {}
    for line in block.splitlines():
        name, _, text = line.strip().partition(" ")
        assert line.startswith("  ") and name and text.strip(), f"not a map line: {line!r}"
        entries[name] = text.strip()
    return entries


def test_the_readme_maps_every_package_and_module():
    here = {p.name + ("/" if p.is_dir() else "") for p in (ROOT / "gateway").iterdir()
            if not p.name.startswith(("__", ".")) and (p.is_dir() or p.suffix == ".py")}
    mapped = readme_map()
    assert {"errors.py", "stages/", "storage/", "cli/"} <= here, "the listing is stale"
    assert sorted(here - mapped.keys()) == [], "in gateway/ but not in the README's package map"
    assert sorted(mapped.keys() - here) == [], "in the README's package map but not in gateway/"


def test_the_quickstart_goes_on_without_npm(tmp_path):
    """The quickstart's first step fetches htmx with npm; on a machine without npm it says what to install
    and the demo still starts (the console works without live search)."""
    (line,) = [ln for ln in README.splitlines() if ln.startswith("{ npm ci")]
    first = line.split(" && ")[0]  # the npm step, up to the venv
    done = subprocess.run(["/bin/sh", "-c", first], cwd=tmp_path, env={"PATH": str(tmp_path)},
                          capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done
    assert "no npm: the console runs without live search (apt install npm)" in done.stdout
