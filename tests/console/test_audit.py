"""The audit pages (``gateway/console/audit.py``): the log, the chain check, the signed export (which
the CLI verifies).  Over the package's one gateway (tests/console/conftest.py)."""

from __future__ import annotations

import hashlib
import json

from gateway.console.app import CSP
from tests.helpers import run_cli
from tests.helpers.console import Page, audits, login, shared


@shared
async def test_signed_audit_export_verifies_and_tampering_is_found(world, tmp_path, capsys):
    auditor = await world.person("auditor2", "auditor")
    async with world.browser() as b:
        await login(b, auditor)
        page = await b.get("/console/audit")
        assert page.has("//form[@id='export']") and page.has("//form[@id='verify']")
        page = await b.post("/console/audit/verify")
        assert "The chain is intact" in " ".join(page.xpath("//*[@id='verify-result']//text()"))
        async with b.s.get(world.base + "/console/audit/export") as r:
            assert r.status == 200 and r.content_type == "application/x-ndjson"
            assert r.headers["Content-Disposition"].startswith("attachment; ")
            assert r.headers["Content-Security-Policy"] == CSP
            body = await r.read()
    lines = body.decode().splitlines()
    assert json.loads(lines[0])["format"] and json.loads(lines[-1])["format"] == "einvoice-gateway-audit-seal/1"
    assert len(lines) > 10
    export = tmp_path / "export.jsonl"
    export.write_bytes(body)
    capsys.readouterr()
    code = await run_cli("audit", "verify", "--file", str(export), "-c", str(world.inst.config))
    out, err = capsys.readouterr()
    assert code == 0 and "audit log OK" in out, out + err
    [exported] = [r for r in await audits(world.store, "console.audit_exported") if r["actor"] == "console:auditor2"]
    assert exported["detail"]["records"] == len(lines) - 2

    i = body.index(b'"action": "') + len(b'"action": "')  # one character of the first record changed
    tampered = tmp_path / "tampered.jsonl"
    tampered.write_bytes(body[:i] + bytes([body[i] ^ 0x01]) + body[i + 1:])
    code = await run_cli("audit", "verify", "--file", str(tampered), "-c", str(world.inst.config))
    out, err = capsys.readouterr()
    assert code != 0 and "differs from what its seal signed" in out + err

    # an administrator may read the log but not export it
    async with world.browser() as b:
        await login(b, world.people["boss"])
        async with b.s.get(world.base + "/console/audit/export") as r:
            assert r.status == 403


def audit_rows(page: Page) -> list[tuple[int, str, str]]:
    """(seq, actor, action) of each row of the audit page's table."""
    return [(int(tr.xpath("string(td[1])")), tr.xpath("string(td[3])"), tr.xpath("string(td[4])"))
            for tr in page.xpath("//table[@id='audit']/tbody/tr")]


@shared
async def test_the_log_is_searched_by_actor_and_action_prefix_newest_first(world):
    p = await world.person("audit-searcher", "auditor")
    actor = f"console:{p.name}"
    async with world.browser() as b:
        await login(b, p)
        await b.post("/console/audit/verify")
        mine = audit_rows(await b.get(f"/console/audit?actor={actor}"))
        assert {a for _, a, _ in mine} == {actor}
        assert [x for _, _, x in mine] == ["console.audit_verified", "console.login", "console.mfa_enrolled"]  # newest first
        users = audit_rows(await b.get("/console/audit?action=user."))
        assert users and all(x.startswith("user.") for _, _, x in users)
        assert {"user.added", "user.password_reset"} <= {x for _, _, x in users}  # how World.person made the accounts
        assert audit_rows(await b.get(f"/console/audit?actor={actor}&action=user.")) == []  # both filters hold
        newest = [s for s, _, _ in audit_rows(await b.get("/console/audit"))]
        head = newest[0]
        assert newest == list(range(head, max(head - 100, 0), -1))  # the newest hundred, newest first
        older = [s for s, _, _ in audit_rows(await b.get(f"/console/audit?before={head}"))]
        assert older == list(range(head - 1, max(head - 101, 0), -1))
        assert [s for s, _, _ in audit_rows(await b.get("/console/audit?before=5"))] == [4, 3, 2, 1]
        assert audit_rows(await b.get("/console/audit?before=five"))[0][0] >= head  # not a number: the newest again
    [verified] = [r for r in await audits(world.store, "console.audit_verified") if r["actor"] == actor]
    assert verified["detail"]["ok"] is True


@shared
async def test_an_export_is_the_range_asked_for_and_sealed(world):
    p = await world.person("audit-ranger", "auditor")
    async with world.browser() as b:
        await login(b, p)
        async with b.s.get(world.base + "/console/audit/export?from=3&to=7") as r:
            assert r.status == 200 and r.headers["Content-Disposition"] == 'attachment; filename="audit-3-7.jsonl"'
            body = await r.read()
        for query in ("from=three", "to=7.5", "from=-"):
            page = await b.get(f"/console/audit/export?{query}")
            assert page.status == 400 and "record numbers" in page.error, query
    lines = body.decode().splitlines(keepends=True)
    header, *records, seal = (json.loads(line) for line in lines)
    assert [r["seq"] for r in records] == [3, 4, 5, 6, 7]
    assert (header["first_seq"], header["last_seq"]) == (3, 7)
    assert seal["sha256"] == hashlib.sha256("".join(lines[:-1]).encode()).hexdigest()  # the seal covers every line before it
    [exported] = [r for r in await audits(world.store, "console.audit_exported") if r["actor"] == f"console:{p.name}"]
    assert exported["detail"] == {"from": 3, "to": 7, "records": 5}


@shared
async def test_an_operator_reads_neither_the_log_nor_an_export(world):
    p = await world.person("audit-operator", "operator")
    async with world.browser() as b:
        await login(b, p)
        assert not (await b.get("/console/")).has("//nav//a[@href='/console/audit']")
        for path in ("/console/audit", "/console/audit/export"):
            page = await b.get(path)
            assert page.status == 403 and not page.has("//table[@id='audit']"), path
        page = await b.post("/console/audit/verify")
        assert page.status == 403 and not page.has("//*[@id='verify-result']")
    assert [r for r in await audits(world.store, "console.audit_exported") if r["actor"] == f"console:{p.name}"] == []
