"""The shared corpus over the real mutual-TLS listener: what must be accepted is, what must not is not.

How one instance takes every valid document:

* Each valid document's supplier identifiers are read here with an XPath of our own (not the
  gateway's): ``scheme:value`` or the bare value.  An identifier may belong to one partner only, so
  documents sharing any identifier — as the gateway compares them: ``DE 123 456 789`` is
  ``DE123456789``, ``GLN:`` is ``0088:`` (gateway/identifiers.py) — or whose payee or tax
  representative names one, are merged (union-find) into one group, and each group becomes one
  partner with its own client certificate.  Where that puts generic UBL and EN 16931 documents in
  one group, the generic ones go to a second instance (``apart``).  The demo partner made by ``init`` is removed first: it
  owns ``DE123456789``, which corpus suppliers use too.
* Within one group the corpus reuses invoice numbers (eleven documents of one merged supplier are
  invoice ``1234567``), and the gateway rightly answers 409 to the same (partner, type, number) with other
  content.  So documents are dealt into *slots*: slot k is one more ``Gateway`` on its own port and
  ``state_dir``, sharing the one instance's ``Parts`` (PKI, partners, compiled schemas, vault), and a
  document goes to the first slot where its (partner, type, number) is still free.  A slot starts in
  milliseconds because the schemas are compiled once.
* Signed documents (the OASIS examples with RSA-SHA1, the Colombian DIAN ones edited after
  signing) are about the schema and the binding here, so their partners use the ``ignore``
  signature policy; tests/stages/test_signature_corpus.py checks the same documents with signatures checked.
* Business rules are on by default (pack ``en16931``).  ``valid`` and ``valid-with-warnings``
  documents pass them, and their partners keep the default, so each receipt names the pack that ran.
  ``valid-xsd-only`` documents (OASIS examples, Colombian DIAN) are generic or national UBL that
  EN 16931 does not apply to: their suppliers are registered as an operator registers such a partner,
  with no rule pack (``rules = []``), and their receipts name none.  With the rules on they are
  refused (tests/test_conformance.py).
* Everything is sent once, concurrently, by a module-scoped fixture; each test (id = corpus path)
  then checks the reply to its own document.
"""

from __future__ import annotations

import asyncio
import csv
import dataclasses
import hashlib
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from lxml import etree

from gateway import logs
from gateway.app.gateway import Gateway, Parts, build
from gateway.config import load as config_mod
from gateway.model import DocumentType, SignaturePolicy
from gateway.operations import instance
from gateway.partners.book import editing
from gateway.stages.rules import BUILTIN
from gateway.tls import client_context
from tests.helpers import CORPUS, add_partner, hold_placeholder_ibans, post
from tests.helpers.corpus import NS, agent_ids, allow_extensions, extension_namespaces, partner_groups, supplier_ids

NUMBER = etree.XPath("string(/*/cbc:ID)", namespaces=NS)
SIGNED = etree.XPath("boolean(//ds:Signature)", namespaces={"ds": "http://www.w3.org/2000/09/xmldsig#"})
VALID = ("valid", "valid-with-warnings", "valid-xsd-only")
XSD_ONLY = "valid-xsd-only"  # EN 16931 does not apply: accepted only from a partner registered with no rule pack
PARSER = etree.XMLParser(resolve_entities=False, no_network=True, load_dtd=False)


@dataclasses.dataclass(frozen=True)
class Doc:
    path: str
    outcome: str
    kind: str = ""  # root element: Invoice or CreditNote
    number: str = ""
    ids: tuple[str, ...] = ()
    signed: bool = False
    agents: tuple[str, ...] = ()  # identifiers of the parties acting for the seller (payee, tax representative)


def load_manifest() -> list[Doc]:
    if not (CORPUS / "MANIFEST.tsv").is_file():
        return []
    docs = []
    with open(CORPUS / "MANIFEST.tsv", encoding="utf-8", newline="") as fh:
        for row in csv.DictReader(fh, delimiter="\t", quoting=csv.QUOTE_NONE):
            path, outcome, ubl = row["path"], row["expected_outcome"], row["doc_type"] in ("Invoice", "CreditNote")
            if ubl and outcome in VALID:
                root = etree.parse(str(CORPUS / path), PARSER).getroot()
                docs.append(Doc(path, outcome, etree.QName(root).localname, NUMBER(root).strip(), supplier_ids(root),
                                bool(SIGNED(root)), agent_ids(root)))
            elif (ubl and outcome == "xsd-invalid") or outcome in ("not-well-formed", "not-xml"):
                docs.append(Doc(path, outcome))
    return docs


DOCS = load_manifest()


def params(select: Any) -> list[Any]:
    chosen = [pytest.param(d, id=d.path) for d in DOCS if select(d)]
    # Without the corpus, one placeholder still asks for the `corpus` fixture (skip, or fail under CI=true).
    return chosen if DOCS else [pytest.param(None, id="corpus-missing")]


@dataclasses.dataclass
class CorpusRun:
    replies: dict[str, tuple[int, dict[str, Any]]]
    stored: int  # invoices committed, over all slots
    parts: Parts


def apart(valid: list[Doc]) -> set[str]:
    """The generic-UBL documents of a supplier that also sends EN 16931 ones: one partner cannot both have
    and skip the rules, so these go to an instance of their own, as to an operator's second gateway for
    generic UBL.  (The OASIS examples' GLN 1234567890123 is a Swedish BIS example's too, and the gateway
    takes ``GLN:`` for ``0088:``.)"""
    owner = partner_groups((d.ids for d in valid), (d.agents for d in valid))
    outcomes: dict[str, set[str]] = {}
    for d in valid:
        outcomes.setdefault(owner[d.ids[0]], set()).add(d.outcome)
    mixed = {n for n, o in outcomes.items() if XSD_ONLY in o and len(o) > 1}
    return {d.path for d in valid if d.outcome == XSD_ONLY and owner[d.ids[0]] in mixed}


async def send_all(inst: instance.Instance, docs: list[Doc], refusals: bool = True) -> CorpusRun:
    """Send ``docs`` to the instance, each valid one from the partner its supplier is, the others (when
    ``refusals``) from any partner."""
    with editing(inst.partners) as partners:
        partners.clear()
    valid = [d for d in docs if d.ids]
    owner = partner_groups((d.ids for d in valid), (d.agents for d in valid))
    ids_of: dict[str, list[str]] = {}
    for i, name in owner.items():
        ids_of.setdefault(name, []).append(i)
    certs = {}
    signed_partners = {owner[d.ids[0]] for d in valid if d.signed}
    outcomes: dict[str, set[str]] = {}
    for d in valid:
        outcomes.setdefault(owner[d.ids[0]], set()).add(d.outcome)
    # One partner cannot both have and skip the rules (``apart``).
    mixed = sorted(n for n, o in outcomes.items() if XSD_ONLY in o and len(o) > 1)
    assert not mixed, f"partners with both valid-xsd-only and EN 16931 documents: {mixed}"
    for name, ids in sorted(ids_of.items()):
        policy = SignaturePolicy.IGNORE if name in signed_partners else SignaturePolicy.IF_PRESENT
        rules = () if outcomes[name] == {XSD_ONLY} else None  # (): `partners add --no-rules`; None: rules.default
        certs[name] = add_partner(inst, name, ids, policy=policy, rules=rules)

    used: list[set[tuple[str, str, str]]] = []
    plan: list[tuple[Doc, str, int]] = []  # document, sending partner, slot
    for d in valid:
        key = (owner[d.ids[0]], d.kind, d.number)
        slot = next((k for k, keys in enumerate(used) if key not in keys), len(used))
        if slot == len(used):
            used.append(set())
        used[slot].add(key)
        plan.append((d, key[0], slot))
    anyone = min(certs)  # rejections come before (or without) binding: any partner may send them
    plan += [(d, anyone, 0) for d in docs if not d.ids and refusals]

    hold_placeholder_ibans(inst.config)  # (the OASIS example's DK1212341234123412)
    # What an operator receiving national profiles does: allow the extensions its partners' documents use.
    allow_extensions(inst.config, extension_namespaces((CORPUS / d.path).read_bytes() for d in docs if d.ids))
    cfg = config_mod.load(inst.config)
    assert cfg.rules_default == (BUILTIN,)  # what `init` writes: the rules are on unless a partner opts out
    parts = build(cfg)
    gws = [Gateway(dataclasses.replace(cfg, state_dir=inst.root / f"state-{k}"), parts)
           for k in range(max(1, len(used)))]
    sessions = {n: aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=client_context(inst.ca.cert, c.cert, c.key)))
                for n, c in certs.items()}

    async def send(d: Doc, partner: str, slot: int) -> tuple[int, dict[str, Any]]:
        url = f"https://127.0.0.1:{gws[slot].port}/v1/invoices"
        answer = await post(sessions[partner], (CORPUS / d.path).read_bytes(), path=url)
        return answer.status, answer.json if answer.json is not None else {"raw": answer.text}

    try:
        for gw in gws:
            await gw.start()
        replies = await asyncio.gather(*(send(*p) for p in plan))
        stored = sum([(await gw.store.reports.counts())["invoices"] for gw in gws])
    finally:
        for s in sessions.values():
            await s.close()
        for gw in gws:
            await gw.stop()
        parts.rules.close()  # the gateways share these parts, so none of them owns (and closes) the rules processes
    return CorpusRun({p[0].path: r for p, r in zip(plan, replies, strict=True)}, stored, parts)


@pytest.fixture(scope="module")
def run(corpus: Path, tmp_path_factory: pytest.TempPathFactory) -> CorpusRun:
    logs.configure("error")
    separate = apart([d for d in DOCS if d.ids])
    main = asyncio.run(send_all(instance.init(tmp_path_factory.mktemp("corpus") / "gw", port=0),
                                [d for d in DOCS if d.path not in separate]))
    if not separate:
        return main
    second = asyncio.run(send_all(instance.init(tmp_path_factory.mktemp("corpus-generic") / "gw", port=0),
                                  [d for d in DOCS if d.path in separate], refusals=False))
    return CorpusRun(main.replies | second.replies, main.stored + second.stored, main.parts)


@pytest.mark.slow
@pytest.mark.parametrize("doc", params(lambda d: d.outcome in VALID and d.ids))
def test_valid_document_is_accepted(run: CorpusRun, doc: Doc) -> None:
    status, body = run.replies[doc.path]
    assert status == 202, body
    assert body["sha256"] == hashlib.sha256((CORPUS / doc.path).read_bytes()).hexdigest()
    assert body["duplicate"] is False
    if doc.outcome == XSD_ONLY:
        assert "rules" not in body, body  # its partner is registered with no rule pack: none ran
    else:
        assert body["rules"]["packs"] == [f"{BUILTIN} {run.parts.rules.packs[BUILTIN].version}"], body


def test_every_acceptance_is_stored(run: CorpusRun) -> None:
    accepted = sum(1 for status, _ in run.replies.values() if status == 202)
    assert accepted == run.stored == sum(1 for d in DOCS if d.outcome in VALID and d.ids)


@pytest.mark.parametrize("doc", params(lambda d: d.outcome in VALID and not d.ids))
def test_document_naming_no_supplier_is_refused(run: CorpusRun, doc: Doc) -> None:
    root = etree.parse(str(CORPUS / doc.path), PARSER).getroot()
    run.parts.schemas.validate(root, DocumentType.from_root(etree.QName(root).namespace, doc.kind))  # schema-valid
    status, body = run.replies[doc.path]
    assert (status, body.get("error")) == (403, "SUPPLIER_NOT_IDENTIFIED"), body


@pytest.mark.parametrize("doc", params(lambda d: d.outcome == "xsd-invalid"))
def test_schema_invalid_document_is_422(run: CorpusRun, doc: Doc) -> None:
    status, body = run.replies[doc.path]
    assert (status, body.get("error")) == (422, "SCHEMA_INVALID"), body
    assert body["details"]
    for detail in body["details"]:
        assert isinstance(detail.get("line"), int) and detail["line"] > 0, detail
        assert isinstance(detail.get("message"), str) and detail["message"], detail
        assert isinstance(detail.get("path"), str) and detail["path"].startswith("/"), detail  # README: line, path, message


@pytest.mark.parametrize("doc", params(lambda d: d.outcome in ("not-well-formed", "not-xml")))
def test_unparseable_document_is_400(run: CorpusRun, doc: Doc) -> None:
    status, body = run.replies[doc.path]
    assert (status, body.get("error")) == (400, "MALFORMED_XML"), body
