"""The README, docs/, the example configuration and CI must say what the code does.

Each document is checked where its text lives: the README's two commands, the error codes and the
partner recipes (docs/partners.md, run as printed against a real gateway), the sidecar schema against
real deliveries (docs/erp.md), the configuration reference against the loader, the package map
against gateway/ (docs/development.md), and every relative link.
"""

from __future__ import annotations

import ast
import asyncio
import json
import os
import re
import shutil
import subprocess
import sys
import tomllib
import unicodedata
from dataclasses import fields, replace
from pathlib import Path
from typing import Any

import pytest
import tomli_w
from lxml import etree

from gateway.config import load as config_load
from gateway.config.reader import Reader
from gateway.inbound import smtp as smtp_listener
from gateway.model import SignaturePolicy
from gateway.operations import instance
from gateway.operations.instance import PRODUCTION_EXAMPLE, render_config
from gateway.partners.edit import edit_partners
from gateway.stages.signature import SigningKey, sign
from gateway.storage.records import DocumentFacts
from tests.helpers import ENV, WAIT_S, Running, eventually, numbered, post
from tests.helpers.signatures import parse, reload_partners

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text(encoding="utf-8")
DOCS = ROOT / "docs"
PARTNERS = (DOCS / "partners.md").read_text(encoding="utf-8")
OPERATORS = (DOCS / "operators.md").read_text(encoding="utf-8")
DEVELOPMENT = (DOCS / "development.md").read_text(encoding="utf-8")
CONFIGURATION = (DOCS / "configuration.md").read_text(encoding="utf-8")
SIDECAR_SCHEMA = DOCS / "erp-sidecar.schema.json"


def required(tool: str) -> str:
    """The path of an independent peer the test drives; a skip naming it, or under CI=true a failure."""
    found = shutil.which(tool)
    if found is None:
        if os.environ.get("CI") == "true":
            pytest.fail(f"{tool} is missing (apt-get install {tool}); required under CI=true")
        pytest.skip(f"{tool} is not installed (apt-get install {tool})")
    return found


# --- the README: a front door with the two commands ---------------------------------------------------


def test_config_example_is_the_rendered_template():
    assert (ROOT / "config" / "einvoice-gateway.toml").read_text() == render_config(**PRODUCTION_EXAMPLE)


def test_ci_runs_the_readme_test_command():
    command = (ROOT / ".ci" / "run").read_text().strip().splitlines()[-1]
    assert f"\n{command}\n" in README


def test_the_quickstart_goes_on_without_npm(tmp_path):
    """The quickstart's first step fetches htmx with npm; on a machine without npm it says what to install
    and the demo still starts (the console works without live search)."""
    (line,) = [ln for ln in README.splitlines() if ln.startswith("{ npm ci")]
    first = line.split(" && ")[0]  # the npm step, up to the venv
    done = subprocess.run(["/bin/sh", "-c", first], cwd=tmp_path, env={"PATH": str(tmp_path)},
                          capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done
    assert "no npm: the console runs without live search (apt install npm)" in done.stdout


def test_the_readme_is_a_front_door():
    """Short, with the fast test set and a map that names every document in docs/."""
    assert len(README.splitlines()) <= 200, "the README is the front door: move detail into docs/"
    assert '`.venv/bin/python -m pytest -m "not slow"`' in README
    documents = {p.name for p in DOCS.iterdir() if p.suffix in (".md", ".json")}
    assert {"partners.md", "erp.md", "operators.md", "configuration.md", "development.md"} <= documents
    unmapped = sorted(name for name in documents if f"](docs/{name})" not in README)
    assert not unmapped, f"documents the README's map does not link: {unmapped}"


# --- links ----------------------------------------------------------------------------------------------


def anchors(markdown: str) -> set[str]:
    """The anchors GitHub makes of a document's headings (lower case, punctuation dropped, spaces to -,
    a repeated heading numbered)."""
    out: set[str] = set()
    seen: dict[str, int] = {}
    in_code = False
    for line in markdown.splitlines():
        if line.startswith("```"):
            in_code = not in_code
        if in_code or not line.startswith("#"):
            continue
        text = line.lstrip("#").strip().lower()
        text = re.sub(r"\[([^]]*)]\([^)]*\)", r"\1", text)  # a link in a heading keeps its text
        slug = "".join(c for c in text if c in " -_" or unicodedata.category(c)[0] in "LN").replace(" ", "-")
        n = seen.get(slug, 0)
        seen[slug] = n + 1
        out.add(slug if n == 0 else f"{slug}-{n}")
    return out


def links(markdown: str) -> list[str]:
    """The targets of the document's Markdown links and images, outside code blocks."""
    text = re.sub(r"^```.*?^```", "", markdown, flags=re.M | re.S)
    text = re.sub(r"`[^`\n]*`", "", text)
    return re.findall(r"!?\[[^]\n]*]\(([^)\s]+)\)", text)


def test_every_relative_link_points_to_a_file_and_anchor_that_exist():
    documents = [ROOT / "README.md", *sorted(DOCS.glob("*.md"))]
    checked, broken = 0, []
    for doc in documents:
        for target in links(doc.read_text(encoding="utf-8")):
            if re.match(r"[a-z][a-z0-9+.-]*:", target):  # https:, mailto: …
                continue
            path, _, anchor = target.partition("#")
            file = (doc.parent / path).resolve() if path else doc
            checked += 1
            if not file.exists():
                broken.append(f"{doc.relative_to(ROOT)}: {target} (no such file)")
            elif anchor and file.suffix == ".md" and anchor not in anchors(file.read_text(encoding="utf-8")):
                broken.append(f"{doc.relative_to(ROOT)}: {target} (no such heading in {file.name})")
    assert checked > 30, "the link pattern is stale"
    assert not broken, "broken links:\n" + "\n".join(broken)


def test_the_anchor_rules_are_githubs():
    assert anchors("# Sending by e-mail (S/MIME)\n## The delivery folder (`type = \"directory\"`)\n## A\n## A\n") == \
        {"sending-by-e-mail-smime", "the-delivery-folder-type--directory", "a", "a-1"}


def test_the_screenshots_are_in_the_repository():
    shown = {Path(t).name for t in links((DOCS / "console.md").read_text(encoding="utf-8")) if "screenshots/" in t}
    assert shown, "the console's screenshots are not shown"
    assert shown <= {p.name for p in (DOCS / "screenshots").iterdir()}


# --- docs/partners.md: error codes and SMTP replies ---------------------------------------------------------


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
    missing = sorted(r for r in reasons if f"`{r}`" not in OPERATORS)
    assert not missing, f"TLS handshake failure reasons missing from docs/operators.md (Monitoring): {missing}"


def smtp_table() -> dict[str, str]:
    """The rows of docs/partners.md's SMTP reply table: the reply's first cell -> the row."""
    table = PARTNERS[PARTNERS.index("| reply | when |"):]
    table = table[:table.index("\n\n")]
    return {m[1]: m[0] for m in re.finditer(r"^\| `([^`]+)`.*$", table, re.M)}


def test_every_smtp_reply_is_documented():
    """Each status and enhanced code the SMTP listener answers with has a row, and each code given its own
    enhanced status is listed on that row."""
    source = (ROOT / "gateway" / "inbound" / "smtp.py").read_text()
    replies = set(re.findall(r'"(\d{3} \d\.\d\.\d+)', source))
    replies |= {f"{s} {e}" for s, e in re.findall(r'status, enhanced = "(\d{3})", "(\d\.\d\.\d+)"', source)}
    assert {"250 2.1.5", "421 4.4.2", "554 5.6.0", "552 5.3.4"} <= replies, "the patterns are stale"
    rows = smtp_table()
    missing = sorted(r for r in replies if not any(cell.startswith(r) for cell in rows))
    assert not missing, f"SMTP replies missing from docs/partners.md: {missing}"
    for code, enhanced in smtp_listener.ENHANCED.items():
        (row,) = [row for cell, row in rows.items() if cell.startswith(f"554 {enhanced}")]
        assert f"`{code}`" in row, f"docs/partners.md: {code} is answered 554 {enhanced}"


# --- docs/partners.md: the recipes, run as printed ----------------------------------------------------------


def recipes() -> dict[str, str]:
    """Each ```sh block of docs/partners.md, byte for byte, by the name in the comment before it."""
    blocks = re.findall(r"^```sh\n(.*?)^```$", PARTNERS, re.M | re.S)
    named = dict(re.findall(r"^<!-- recipe: ([a-z-]+) -->\n```sh\n(.*?)^```$", PARTNERS, re.M | re.S))
    assert len(named) == len(blocks), "every ```sh block of docs/partners.md is run by a test: name it <!-- recipe: … -->"
    return named


def settable() -> set[str]:
    """The variables the reader is told to set, in the plain blocks of docs/partners.md."""
    blocks = re.findall(r"^```\n(.*?)^```$", PARTNERS, re.M | re.S)
    return {m for b in blocks for m in re.findall(r"^([A-Z_]+)=\S+", b, re.M)}


def test_the_recipes_use_only_variables_the_reader_sets():
    names = recipes()
    assert set(names) == {"https-send", "https-status", "https-refusal", "smime-send"}
    allowed = settable() | {"MESSAGE_ID"}  # the status recipe says where MESSAGE_ID comes from
    for name, script in names.items():
        used = set(re.findall(r"\$\{?([A-Z_]+)", script))
        assert used <= allowed, f"{name} uses {sorted(used - allowed)}, which no 'set these' block names"


async def run_recipe(name: str, env: dict[str, str], cwd: Path) -> tuple[int, str, str]:
    """Run one recipe with bash (errexit, nounset, pipefail), the reader's variables and nothing else."""
    script = cwd / f"{name}.sh"
    script.write_text(recipes()[name])
    base = {k: os.environ[k] for k in ("PATH", "HOME", "LANG") if k in os.environ}
    proc = await asyncio.create_subprocess_exec("bash", "-euo", "pipefail", str(script), cwd=cwd, env={**base, **env},
                                                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    return proc.returncode or 0, out.decode(), err.decode()


async def test_the_https_recipes_work_as_printed(gateway: Running, tmp_path: Path):
    required("curl")
    inst = gateway.inst
    invoice = tmp_path / "invoice.xml"
    invoice.write_bytes(numbered("RECIPE-HTTPS-1"))
    env = {"GATEWAY": gateway.url, "CA": str(inst.ca.cert), "CERT": str(inst.demo_client.cert),
           "KEY": str(inst.demo_client.key), "INVOICE": invoice.name}
    assert set(env) <= settable()

    code, out, err = await run_recipe("https-send", env, tmp_path)
    assert code == 0, err
    receipt = json.loads(out)
    assert (receipt["status"], receipt["duplicate"]) == ("accepted", False), receipt
    assert (await gateway.gw.store.reports.counts())["invoices"] == 1

    code, out, err = await run_recipe("https-status", env | {"MESSAGE_ID": receipt["message_id"]}, tmp_path)
    assert code == 0, err
    status = json.loads(out)
    assert (status["message_id"], status["sha256"]) == (receipt["message_id"], receipt["sha256"])

    code, out, err = await run_recipe("https-refusal", env, tmp_path)
    assert code == 0, err
    body, status = out.rstrip("\n").rsplit("\n", 1)
    assert status == "HTTP 400" and json.loads(body)["error"] == "DTD_FORBIDDEN"
    shown = PARTNERS[PARTNERS.index("<!-- recipe: https-refusal -->"):]
    assert out.rstrip("\n") in shown, "docs/partners.md shows another answer than the refusal recipe gets"


async def test_the_smime_recipe_works_as_printed(gateway: Running, tmp_path: Path):
    """Signed, then encrypted with openssl, sent with curl over SMTP with STARTTLS: accepted and stored."""
    required("curl")
    required("openssl")
    inst = gateway.inst
    assert gateway.gw.smtp_port, "the instance has no SMTP listener"
    invoice = tmp_path / "invoice.xml"
    invoice.write_bytes(numbered("RECIPE-SMIME-1"))
    env = {"SMTP": f"smtp://127.0.0.1:{gateway.gw.smtp_port}", "CA": str(inst.ca.cert), "FROM": instance.DEMO_EMAIL,
           "TO": f"invoices@{instance.MAIL_HOST}", "SMIME_CERT": str(inst.demo_smime.cert),
           "SMIME_KEY": str(inst.demo_smime.key), "GATEWAY_SMIME_CERT": str(inst.smime.cert), "INVOICE": invoice.name}
    assert set(env) <= settable()
    before = (await gateway.gw.store.reports.counts())["invoices"]

    code, out, err = await run_recipe("smime-send", env, tmp_path)
    assert code == 0, f"curl: {err}"
    counts = await gateway.gw.store.reports.counts()
    assert counts["invoices"] == before + 1, counts
    # What was sent is what openssl made of the invoice: the delivered document is its bytes.
    await gateway.gw.outbox.run_once()
    delivered = [p for p in inst.delivery_folder.glob("*.xml") if p.read_bytes() == invoice.read_bytes()]
    assert len(delivered) == 1


# --- docs/erp.md: the sidecar and its JSON Schema -----------------------------------------------------------


def jsonschema_module() -> Any:
    try:
        import jsonschema
    except ImportError:
        if os.environ.get("CI") == "true":
            pytest.fail("the jsonschema package is missing (pip install -e '.[test]'); required under CI=true")
        pytest.skip("the jsonschema package is not installed (pip install -e '.[test]')")
    return jsonschema


def test_the_sidecar_schema_names_every_field_the_code_writes():
    schema = json.loads(SIDECAR_SCHEMA.read_text())
    assert schema["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    assert schema["additionalProperties"] is False
    written = {f.name for f in fields(DocumentFacts)}
    assert set(schema["properties"]) == written, "docs/erp-sidecar.schema.json and DocumentFacts differ"
    assert set(schema["required"]) == written
    documented = set(re.findall(r"`([a-z_0-9]+)`", (DOCS / "erp.md").read_text(encoding="utf-8")))
    assert written <= documented, f"sidecar members missing from docs/erp.md: {sorted(written - documented)}"


async def set_demo_partner(running: Running, **change: Any) -> None:
    def edit(partners: list[Any], store: Any) -> None:
        i = next(i for i, p in enumerate(partners) if p.name == "demo-supplier")
        if "signing_certs" in change:
            change["signing_certs"] = tuple(store(c, "--signing-cert") for c in change["signing_certs"])
        partners[i] = replace(partners[i], **change)

    await asyncio.to_thread(edit_partners, running.inst.partners, "demo-supplier", edit)
    await reload_partners(running, lambda d: (p := d.get("demo-supplier")) is not None
                          and all(k == "signing_certs" or getattr(p, k) == v for k, v in change.items()))


async def test_real_sidecars_match_the_schema(gateway: Running):
    """Sidecars the folder destination writes for a signed invoice checked by the rules and for an unsigned
    one from a partner without rules: valid against docs/erp-sidecar.schema.json, which admits no other
    member (additionalProperties false, at every level)."""
    jsonschema = jsonschema_module()
    schema = json.loads(SIDECAR_SCHEMA.read_text())
    jsonschema.Draft202012Validator.check_schema(schema)
    validator = jsonschema.Draft202012Validator(schema, format_checker=jsonschema.FormatChecker())
    inst = gateway.inst
    await set_demo_partner(gateway, signature_policy=SignaturePolicy.REQUIRED, signing_certs=[inst.signing.cert])
    root = parse(numbered("SIDECAR-1"))
    sign(root, SigningKey.load(inst.signing.cert.read_bytes(), inst.signing.key.read_bytes()))
    signed = etree.tostring(root.getroottree(), xml_declaration=True, encoding="UTF-8")

    sidecars = []
    async with gateway.session() as s:
        first = await post(s, signed)
        assert first.status == 202, first.json
        await set_demo_partner(gateway, signature_policy=SignaturePolicy.IGNORE, rules=())
        second = await post(s, numbered("SIDECAR-2"))
        assert second.status == 202, second.json
    await gateway.gw.outbox.run_once()
    for answer in (first, second):
        path = inst.delivery_folder / f"{answer.json['message_id']}.json"
        await eventually(path.exists, f"the sidecar {path.name}", WAIT_S)
        sidecars.append(json.loads(path.read_text()))
    for sidecar in sidecars:
        errors = sorted(validator.iter_errors(sidecar), key=str)
        assert not errors, f"{sidecar['message_id']}: " + "; ".join(e.message for e in errors)
    assert sidecars[0]["signature"] is not None and sidecars[0]["rules"] is not None, sidecars[0]
    assert sidecars[1]["signature"] is None and sidecars[1]["rules"] is None, sidecars[1]
    # and the schema does refuse a member the code might add
    assert not validator.is_valid(sidecars[0] | {"new_field": 1})
    assert not validator.is_valid(sidecars[0] | {"signature": sidecars[0]["signature"] | {"new_field": 1}})


# --- docs/configuration.md: every key the loader accepts, and no other ------------------------------------

READER_CALLS = ("string", "integer", "number", "boolean", "str_list", "int_list", "choice", "file", "secret", "files",
                "entries", "table", "tables")


def full_config(folder: Path) -> Path:
    """An instance's configuration with every optional table and key given, so that the loader reads them all."""
    inst = instance.init(folder / "gw", port=0)
    root = inst.root
    (root / "ubl-2.3" / "maindoc").mkdir(parents=True)
    (root / "rules").mkdir()
    (root / "rules" / "ubl.xsl").write_bytes(b"<!-- urn:oasis:names:specification:ubl:schema:xsd:Invoice-2 -->")
    secret = root / "keys" / "erp.hmac"
    secret.write_text("k" * 40)
    secret.chmod(0o600)
    data = tomllib.loads(inst.config.read_text())
    crt, key, ca = str(inst.demo_client.cert), str(inst.demo_client.key), str(inst.ca.cert)
    data["validation"] = {"schemas": [{"ubl_version": "2.3", "directory": "ubl-2.3"}], "cii_schema": ca,
                          "extension_namespaces": ["urn:example:extension"]}
    data["rules"] |= {"processes": 1, "timeout_s": 30.0, "packs": [
        {"name": "extra", "version": "1", "directory": "rules", "ubl": "rules/ubl.xsl", "cii": "rules/ubl.xsl"}]}
    data["vault"]["current"] = inst.key_id
    data["destinations"][0] |= {"group": "root", "mode": "0640"}  # the directory destination init makes
    data["destinations"] += [
        {"name": "erp-api", "type": "https", "url": "https://erp.example/in", "hmac_key_file": str(secret),
         "bearer_token_file": str(secret), "ca": ca, "client_certificate": crt, "client_key": key},
        {"name": "to-partners", "type": "partner", "client_certificate": crt, "client_key": key, "ca": ca},
        {"name": "to-acme", "type": "partner", "client_certificate": crt, "client_key": key, "partner": "acme"},
        {"name": "ap-mail", "type": "email", "to": "ap@example.com", "recipient_certificate": str(inst.smime.cert),
         "cipher": "aes-256-cbc"}]
    data["routes"] = [{"destinations": ["erp-inbox"], "receiver": "0088:4000002000005", "partner": "demo-supplier",
                       "document_type": "ubl:Invoice", "customization": "urn:x", "profile": "urn:y"}]
    data["routing"] = {"default": ["erp-inbox"]}
    data["outbound"] = {"socket": "outbound.sock", "socket_mode": "0660", "listen_host": "127.0.0.1", "listen_port": 0,
                        "client_ca": [ca], "client_spki": ["ab" * 32], "identities": ["0088:4000002000005"],
                        "destination": "to-partners"}
    data["admin"]["token_file"] = str(secret)
    data["audit"] = {"checkpoint_interval_s": 60.0, "trusted_certificates": [str(inst.signing.cert)]}
    data["retention"] = {"delete_after_days": 30.0}
    data["revocation"] = {"crls": [ca], "soft_fail": True, "max_age_h": 24.0}
    data["certificates"] = {"warn_days": [30]}
    data["smtp"] |= {"enabled": True, "max_message_bytes": 1 << 20}
    data["smarthost"] = {"host": "relay.example", "port": 587, "ca": ca, "username": "gw", "password_file": str(secret),
                         "timeout_s": 30.0}
    data["logging"] = {"level": "info"}
    inst.config.write_text(tomli_w.dumps(data))
    return inst.config


def accepted_keys(config: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[set[str], set[str]]:
    """(keys, tables) the loader read from ``config``: exactly what ``Reader.done()`` lets through
    (a key is accepted when the loader asks for it).  Arrays of tables are written ``name[]``."""
    keys: set[str] = set()
    tables: set[str] = set()
    get, table, array = Reader._get, Reader.table, Reader.tables

    def path(r: Reader, name: str) -> str:
        return re.sub(r"\[\d+\]", "[]", r.key(name))

    def seen_get(self: Reader, name: str, default: Any, needed: bool) -> Any:
        keys.add(path(self, name))
        return get(self, name, default, needed)

    def seen_table(self: Reader, name: str) -> Reader:
        tables.add(path(self, name))
        return table(self, name)

    def seen_array(self: Reader, name: str) -> list[Reader]:
        tables.add(path(self, name) + "[]")
        return array(self, name)

    monkeypatch.setattr(Reader, "_get", seen_get)
    monkeypatch.setattr(Reader, "table", seen_table)
    monkeypatch.setattr(Reader, "tables", seen_array)
    config_load.load(config)
    return {k for k in keys if k not in tables and f"{k}[]" not in tables}, tables


def names_the_loader_reads() -> set[str]:
    """Every key name gateway/config/load.py asks a Reader for, found in its source."""
    found = set()
    for node in ast.walk(ast.parse((ROOT / "gateway" / "config" / "load.py").read_text())):
        if not isinstance(node, ast.Call):
            continue
        if isinstance(node.func, ast.Attribute) and node.func.attr in READER_CALLS and node.args:
            first = node.args[0]
        elif isinstance(node.func, ast.Name) and node.func.id == "_octal" and len(node.args) > 1:
            first = node.args[1]
        else:
            continue
        if isinstance(first, ast.Constant) and isinstance(first.value, str):
            found.add(first.value)
    return found | set(config_load.ROUTE_CRITERIA)  # (read in a loop over the tuple)


def documented_keys() -> set[str]:
    """The keys in the first column of docs/configuration.md's tables, `table.key` (or `table[].key`)."""
    out = set()
    for line in CONFIGURATION.splitlines():
        if line.startswith("| `"):
            first = line.split(" | ")[0]
            out |= set(re.findall(r"`([a-z_]+(?:\[\])?(?:\.[a-z_]+(?:\[\])?)+)`", first))
    return out


def test_the_configuration_reference_has_every_key_and_no_other(tmp_path, monkeypatch):
    keys, tables = accepted_keys(full_config(tmp_path), monkeypatch)
    read = {k.rsplit(".", 1)[-1] for k in keys} | {t.removesuffix("[]").rsplit(".", 1)[-1] for t in tables}
    unexercised = sorted(names_the_loader_reads() - read)
    assert not unexercised, f"gateway/config/load.py reads {unexercised}, which full_config() does not give: add them"
    assert len(keys) > 100, "the configuration was not read"
    documented = documented_keys()
    assert sorted(keys - documented) == [], "accepted by the loader but missing from docs/configuration.md"
    assert sorted(documented - keys) == [], "in docs/configuration.md but not accepted by the loader"
    headings = set(re.findall(r"^## ([a-z]+)$", CONFIGURATION, re.M))
    assert {t.split(".")[0].removesuffix("[]") for t in tables} <= headings, "a table without its section"


# --- docs/operators.md: init --json ----------------------------------------------------------------------------


def test_every_init_json_key_is_documented(tmp_path):
    done = subprocess.run([sys.executable, "-m", "gateway", "init", str(tmp_path / "gw"), "--port", "0", "--json"],
                          capture_output=True, text=True, timeout=120, env=ENV)
    assert done.returncode == 0, done.stderr
    keys = set(json.loads(done.stdout))
    section = OPERATORS[OPERATORS.index("`init --json` prints"):]
    section = section[:section.index("\n\n")]
    missing = sorted(k for k in keys if f"`{k}`" not in section)
    assert not missing, f"init --json keys missing from docs/operators.md: {missing}"
    listed = set(re.findall(r"`([a-z_]+)`", section)) - {"init"}
    assert listed <= keys, f"docs/operators.md lists init --json keys it does not print: {sorted(listed - keys)}"


# --- docs/development.md: the package map ---------------------------------------------------------------------


def package_map() -> dict[str, str]:
    """The map under "## The package map": path under gateway/ (``stages/schema.py``, ``storage/sqlite/``) -> its line."""
    section = DEVELOPMENT[DEVELOPMENT.index("\n## The package map\n"):]
    block = section[section.index("```\ngateway/\n") + len("```\ngateway/\n"):]
    block = block[:block.index("```")]
    entries: dict[str, str] = {}
    parents: list[str] = []
    for line in block.splitlines():
        indent = len(line) - len(line.lstrip(" "))
        name, _, text = line.strip().partition(" ")
        assert indent % 2 == 0 and indent >= 2 and name and text.strip(), f"not a map line: {line!r}"
        depth = indent // 2 - 1
        assert depth <= len(parents), f"indented under nothing: {line!r}"
        parents = parents[:depth]
        entries["".join(parents) + name] = text.strip()
        if name.endswith("/"):
            parents.append(name)
    return entries


def test_the_map_lists_every_package_and_module():
    gateway = ROOT / "gateway"
    here = {str(p.relative_to(gateway)) + ("/" if p.is_dir() else "") for p in gateway.rglob("*")
            if "__pycache__" not in p.parts and p.name != "__init__.py"
            and (p.is_dir() or (p.suffix == ".py" and p.parent.name not in ("templates", "static")))}
    mapped = package_map()
    assert {"errors.py", "stages/", "stages/schema.py", "storage/sqlite/", "storage/sqlite/engine.py"} <= here, \
        "the listing is stale"
    assert sorted(here - mapped.keys()) == [], "in gateway/ but not in docs/development.md's package map"
    assert sorted(mapped.keys() - here) == [], "in docs/development.md's package map but not in gateway/"


def layers_the_layer_test_holds() -> list[set[str]]:
    """LAYERS of tests/test_layers.py, read from its source (a test file never imports another)."""
    tree = ast.parse((ROOT / "tests" / "test_layers.py").read_text())
    (value,) = [n.value for n in tree.body if isinstance(n, ast.Assign) and getattr(n.targets[0], "id", "") == "LAYERS"]
    return [set(ast.literal_eval(s)) for s in value.elts]  # type: ignore[attr-defined]


def test_the_layers_are_the_ones_the_layer_test_holds():
    LAYERS = layers_the_layer_test_holds()
    table = DEVELOPMENT[DEVELOPMENT.index("| layer, bottom first |"):]
    rows = [row for row in table[:table.index("\n\n")].splitlines()[2:]]
    assert len(rows) == len(LAYERS)
    for row, layer in zip(rows, LAYERS, strict=True):
        named = {n.strip("/") for n in re.findall(r"`([^`]+)`", row)}
        assert named == layer - {"gateway"}, row
