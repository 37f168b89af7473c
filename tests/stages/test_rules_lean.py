"""The rules processes compile each stylesheet without its ``svrl:fired-rule`` output (gateway/stages/rules.py).

Nothing reads those elements, and writing them is about a sixth of an evaluation.  Removing them must
change no finding: the slow test evaluates every UBL and CII document of the corpus with the stylesheet
as published and as compiled by the gateway and compares the findings one by one.  The fast ones check
that relative ``xsl:include`` still resolves (the stylesheet is compiled from text with the file's
base URI; only the file named in the configuration is pruned, as compiled Schematron is one file),
that text following a removed element stays, and that an unreadable stylesheet names its key.

Saxon runs in a process of its own here too (``COMPARE``), as in the gateway: a test worker that has
loaded it once can later die of it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from gateway.errors import ConfigError
from gateway.model import Syntax
from gateway.stages import rules
from tests.helpers import CII_RULES, CORPUS, ENV

SVRL_NS = 'xmlns:svrl="http://purl.oclc.org/dsdl/svrl"'
XSL_NS = 'xmlns:xsl="http://www.w3.org/1999/XSL/Transform"'

# Reads {"stylesheet": path, "documents": [path or inline XML]} on stdin; writes, per document, the report
# of the stylesheet as published and as the gateway compiles it, with their findings (or what Saxon said).
COMPARE = r"""
import json, sys
from pathlib import Path
from saxonche import PySaxonProcessor
from gateway.stages import rules

job = json.load(sys.stdin)
processor = PySaxonProcessor(license=False)
path = Path(job["stylesheet"])
published = processor.new_xslt30_processor().compile_stylesheet(stylesheet_file=str(path))
lean = rules._Compiled(processor, path, "rules")
out = []
for doc in job["documents"]:
    text = doc if doc.startswith("<") else Path(doc).read_text("utf-8")
    try:
        expected = str(published.transform_to_string(xdm_node=processor.parse_xml(xml_text=text)))
    except Exception as exc:  # not XML Saxon reads: nothing to compare
        out.append({"document": doc, "unreadable": str(exc)[:200]})
        continue
    got = lean.report(text)
    findings = [[f.rule, f.flag, f.location, f.message] for f in rules.parse_svrl(got.encode())]
    out.append({"document": doc, "published": expected, "lean": got, "lean_findings": findings,
                "published_findings": [[f.rule, f.flag, f.location, f.message]
                                       for f in rules.parse_svrl(expected.encode())] if "schematron-output" in expected else None})
json.dump(out, sys.stdout)
"""


def compare(stylesheet: Path, documents: list[str]) -> list[dict[str, Any]]:
    done = subprocess.run([sys.executable, "-c", COMPARE], input=json.dumps({"stylesheet": str(stylesheet),
                          "documents": documents}), capture_output=True, text=True, env=ENV, timeout=600, check=True)
    return list(json.loads(done.stdout))


def test_fired_rules_go_and_everything_else_stays(tmp_path: Path) -> None:
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

    [result] = compare(main, ["<doc><total>-5</total></doc>"])
    assert result["published"].count("fired-rule") == 2  # the root template's and the included template's
    assert result["lean"].count("fired-rule") == 1  # only the named file is pruned: an included one keeps its own
    assert "after-fired" in result["lean"]  # text beside a removed element is output as before
    assert result["lean_findings"] == result["published_findings"] == [["T-1", "fatal", "/total", "the total is negative"]]


def test_an_unreadable_stylesheet_names_its_key(tmp_path: Path) -> None:
    broken = tmp_path / "broken.xsl"
    broken.write_text("<xsl:stylesheet")
    with pytest.raises(ConfigError) as exc:
        rules._without_fired_rules(broken, "rules.packs[peppol].ubl")  # read before Saxon sees it
    assert exc.value.message.startswith(f"rules.packs[peppol].ubl: cannot compile {broken}: "), exc.value.message


def corpus_documents(root_ns: bytes) -> list[str]:
    found = [str(p) for p in sorted((CORPUS / "invoices").rglob("*.xml")) if root_ns in p.read_bytes()[:4000]]
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
def test_the_corpus_gets_identical_findings(syntax: Syntax, root_ns: bytes) -> None:
    path = rules.builtin_pack().stylesheets[Syntax.UBL] if syntax is Syntax.UBL else CII_RULES
    compared = 0
    for result in compare(path, corpus_documents(root_ns)):
        if "unreadable" in result:  # the corpus's malformed samples
            continue
        assert "fired-rule" in result["published"] or result["published_findings"] is None
        assert "fired-rule" not in result["lean"], result["document"]
        assert result["lean_findings"] == result["published_findings"], result["document"]
        compared += 1
    assert compared >= (600 if syntax is Syntax.UBL else 50), compared
