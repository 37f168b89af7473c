"""The rules processes compile each stylesheet without its ``svrl:fired-rule`` output (gateway/stages/rules.py).

Nothing reads those elements, and writing them is about a sixth of an evaluation.  Removing them must
change no finding: the slow test evaluates every UBL and CII document of the corpus with the stylesheet
as published and as compiled by the gateway and compares the findings one by one.  The fast ones check
that relative ``xsl:include`` still resolves (the stylesheet is compiled from text with the file's
base URI; only the file named in the configuration is pruned, as compiled Schematron is one file),
that text following a removed element stays, and that an unreadable stylesheet names its key.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from saxonche import PySaxonProcessor

from gateway.errors import ConfigError
from gateway.model import Syntax
from gateway.stages import rules
from tests.helpers import CII_RULES, CORPUS

SVRL_NS = 'xmlns:svrl="http://purl.oclc.org/dsdl/svrl"'
XSL_NS = 'xmlns:xsl="http://www.w3.org/1999/XSL/Transform"'


@pytest.fixture(scope="module")
def processor() -> PySaxonProcessor:
    return PySaxonProcessor(license=False)


def as_published(processor: PySaxonProcessor, path: Path) -> object:
    return processor.new_xslt30_processor().compile_stylesheet(stylesheet_file=str(path))


def report(processor: PySaxonProcessor, executable: object, document: str) -> str:
    return str(executable.transform_to_string(xdm_node=processor.parse_xml(xml_text=document)))  # type: ignore[attr-defined]


def test_fired_rules_go_and_everything_else_stays(processor: PySaxonProcessor, tmp_path: Path) -> None:
    (tmp_path / "parts").mkdir()
    (tmp_path / "parts" / "check.xsl").write_text(
        f'<xsl:stylesheet version="2.0" {XSL_NS} {SVRL_NS}>'
        '<xsl:template match="total"><svrl:fired-rule context="total"/>after-fired'
        '<xsl:if test="number(.) lt 0"><svrl:failed-assert id="T-1" flag="fatal" location="/total">'
        '<svrl:text>[T-1] the total is negative</svrl:text></svrl:failed-assert></xsl:if></xsl:template>'
        '</xsl:stylesheet>')
    main = tmp_path / "main.xsl"
    main.write_text(
        f'<xsl:stylesheet version="2.0" {XSL_NS} {SVRL_NS}><xsl:include href="parts/check.xsl"/>'
        '<xsl:template match="/"><svrl:schematron-output><svrl:fired-rule context="/"/>'
        '<xsl:apply-templates select="//total"/></svrl:schematron-output></xsl:template></xsl:stylesheet>')
    lean = rules._Compiled(processor, main, "rules.packs[t].ubl")

    document = "<doc><total>-5</total></doc>"
    published = report(processor, as_published(processor, main), document)
    assert published.count("fired-rule") == 2  # the root template's and the included template's
    got = report(processor, lean.executable, document)
    assert got.count("fired-rule") == 1  # only the named file is pruned: an included one keeps its own
    assert "after-fired" in got  # text beside a removed element is output as before
    assert lean.run(document) == rules.parse_svrl(published.encode()) == [
        rules.Finding("T-1", "fatal", "/total", "the total is negative")]


def test_an_unreadable_stylesheet_names_its_key(processor: PySaxonProcessor, tmp_path: Path) -> None:
    broken = tmp_path / "broken.xsl"
    broken.write_text("<xsl:stylesheet")
    with pytest.raises(ConfigError) as exc:
        rules._Compiled(processor, broken, "rules.packs[peppol].ubl")
    assert exc.value.message.startswith(f"rules.packs[peppol].ubl: cannot compile {broken}: "), exc.value.message


def corpus_documents(root_ns: bytes) -> list[Path]:
    found = [p for p in sorted((CORPUS / "invoices").rglob("*.xml")) if root_ns in p.read_bytes()[:4000]]
    if not found and os.environ.get("CI") == "true":
        pytest.fail(f"no corpus documents under {CORPUS}: the corpus is required under CI=true")
    if not found:
        pytest.skip(f"no corpus at {CORPUS}")
    return found


@pytest.mark.slow
@pytest.mark.parametrize(("syntax", "root_ns"), [
    (Syntax.UBL, b"urn:oasis:names:specification:ubl:schema:xsd:"),
    (Syntax.CII, b"urn:un:unece:uncefact:data:standard:CrossIndustryInvoice:100"),
])
def test_the_corpus_gets_identical_findings(processor: PySaxonProcessor, syntax: Syntax, root_ns: bytes) -> None:
    path = rules.builtin_pack().stylesheets[Syntax.UBL] if syntax is Syntax.UBL else CII_RULES
    published, lean = as_published(processor, path), rules._Compiled(processor, path, "rules")
    compared = 0
    for doc in corpus_documents(root_ns):
        try:
            text = doc.read_text("utf-8")
            expected = report(processor, published, text)
        except Exception:  # noqa: BLE001 - not XML Saxon reads (the corpus's malformed samples): nothing to compare
            continue
        assert "fired-rule" in expected or "schematron-output" not in expected
        got = report(processor, lean.executable, text)
        assert "fired-rule" not in got, doc
        assert rules.parse_svrl(got.encode()) == rules.parse_svrl(expected.encode()), doc
        compared += 1
    assert compared >= (600 if syntax is Syntax.UBL else 50), compared
