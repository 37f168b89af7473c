"""What the rules stage's report carries (gateway/stages/rules.py), issue 23: only what is read.

The pipeline reads failed assertions and successful reports from the SVRL; ``svrl:fired-rule`` (one
element per rule context matched, thousands per invoice) is written by the official stylesheet and
read by nobody, yet writing it is about a sixth of the evaluation.  ``svrl_report`` compiles and runs
the built-in pack in a rules process of its own, exactly as the gateway's do, and hands back the whole report.
"""

from __future__ import annotations

import pytest
from lxml import etree

from gateway.cli.demo import SAMPLE
from gateway.model import Syntax
from gateway.stages.rules import BUILTIN, SVRL, RuleEngine, builtin_pack, parse_svrl, svrl_report

PAYABLE = b'<cbc:PayableAmount currencyID="EUR">1250.00</cbc:PayableAmount>'
# The sample with a payable amount its lines do not add up to: the report has findings to compare.
WRONG_TOTAL = SAMPLE.replace(PAYABLE, PAYABLE.replace(b"1250.00", b"1.00")).decode()


@pytest.fixture(scope="module")
def report() -> etree._Element:
    """The default pack's report on the sample invoice, as the stylesheet writes it."""
    return etree.fromstring(svrl_report(builtin_pack(), Syntax.UBL, SAMPLE.decode()).encode())


def test_the_report_is_the_one_the_rules_processes_read() -> None:
    engine = RuleEngine([], processes=1)
    try:
        [findings] = engine.run(WRONG_TOTAL, Syntax.UBL, (BUILTIN,))
    finally:
        engine.close()
    report = svrl_report(builtin_pack(), Syntax.UBL, WRONG_TOTAL)
    assert findings and any(f.flag == "fatal" for f in findings), findings
    assert parse_svrl(report.encode()) == findings


def test_the_default_report_carries_no_fired_rule_output(report: etree._Element) -> None:
    assert report.tag == f"{{{SVRL}}}schematron-output"
    fired = sum(1 for _ in report.iter(f"{{{SVRL}}}fired-rule"))
    assert fired == 0, f"the en16931 report has {fired} svrl:fired-rule elements that nothing reads"
