"""The operations commands: ``keys``, ``audit``, ``backup`` and ``partners check``.

They work on the state directory and key files directly, so they run beside the daemon (as root or
as the service's user); what they change is recorded in the audit log with who did it.
"""

from __future__ import annotations

import argparse
import json
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from ..config import load as config_mod
from ..errors import ConfigError, VaultError
from ..operations import audit as audit_mod
from ..operations.instance import current_user
from ..storage.sqlite import SqliteStore
from ..vault import Vault, read_key_file, write_key_file

REWRAP_BATCH = 200  # objects re-sealed per transaction: the daemon's writes wait at most one batch


def add_parsers(sub: Any, with_config: Any) -> None:
    k = sub.add_parser("keys", help="master keys: list, rotate, rewrap stored objects, retire")
    ksub = k.add_subparsers(dest="action", required=True)
    with_config(ksub.add_parser("list", help="key ids, creation dates and how many stored objects each protects"))
    with_config(ksub.add_parser("rotate", help="write a new master key, current for new invoices after a reload"))
    rw = with_config(ksub.add_parser("rewrap", help="re-seal objects stored under older keys with the current key "
                                     "(safe while the daemon runs)"))
    rw.add_argument("--key", action="append", default=[], help="only objects under this key id (default: every older key)")
    rw.add_argument("--daemon-stopped", action="store_true",
                    help="the gateway is not running: do not require it to seal with the current key already")
    rt = with_config(ksub.add_parser("retire", help="stop loading a key that no stored object needs any more"))
    rt.add_argument("key_id")
    for sp in ksub.choices.values():
        sp.add_argument("--by", help="who does it (recorded in the audit log; default: the current user)")

    a = sub.add_parser("audit", help="the tamper-evident audit log")
    asub = a.add_subparsers(dest="action", required=True)
    av = with_config(asub.add_parser("verify", help="check the hash chain and the signed checkpoints"))
    av.add_argument("--file", help="verify an export (audit export) instead of the live log")
    av.add_argument("--json", action="store_true")
    ae = with_config(asub.add_parser("export", help="write a range of records (JSON lines) for an auditor"))
    ae.add_argument("--from-seq", type=int, help="first record (default: the first)")
    ae.add_argument("--to-seq", type=int, help="last record (default: the last)")
    ae.add_argument("--since", help="records from this time (RFC 3339, UTC)")
    ae.add_argument("--until", help="records before this time")
    ae.add_argument("-o", "--output", required=True, help="file to write (refused if it exists)")
    with_config(asub.add_parser("checkpoint", help="sign the chain's head now (the daemon does it periodically)"))
    al = with_config(asub.add_parser("list", help="the newest records"))
    al.add_argument("--limit", type=int, default=50)
    al.add_argument("--json", action="store_true")

    b = sub.add_parser("backup", help="consistent, still-encrypted snapshots of the state directory")
    bsub = b.add_subparsers(dest="action", required=True)
    bc = with_config(bsub.add_parser("create", help="snapshot the index and the encrypted store (safe while running)"))
    bc.add_argument("dest", help="a new folder for the backup")
    bv = with_config(bsub.add_parser("verify", help="check a backup's manifest, hashes and integrity"))
    bv.add_argument("src")
    bv.add_argument("--deep", action="store_true", help="also open every stored object with the configured keys")
    br = with_config(bsub.add_parser("restore", help="restore a backup into an empty state directory"))
    br.add_argument("src")
    br.add_argument("--state-dir", help="where to restore (default: instance.state_dir of the configuration)")


def _vault(cfg: config_mod.Config) -> Vault:
    return Vault.from_files(cfg.vault.keys, cfg.vault.current)


def _record(cfg: config_mod.Config, store: SqliteStore, args: argparse.Namespace, action: str, detail: dict[str, Any],
            partner: str | None = None) -> None:
    record(cfg, store, getattr(args, "by", None) or current_user(), action, partner, detail)


def record(cfg: config_mod.Config, store: SqliteStore, actor: str, action: str, partner: str | None,
           detail: dict[str, Any]) -> None:
    """An administrative audit record, sealed at once by a signed checkpoint (the daemon may be stopped)."""
    store.audit(actor, action, partner, None, detail).result()
    seal(cfg, store)


def seal(cfg: config_mod.Config, store: SqliteStore) -> None:
    """A signed checkpoint over the audit chain's head, now (a CLI change is sealed at once)."""
    from ..stages.signature import SigningKey

    if cfg.signing is not None:
        signer = SigningKey.load(cfg.signing.certificate.read_bytes(), cfg.signing.private_key.read_bytes())
        store.audit_checkpoint(lambda s, h: audit_mod.checkpoint_detail(signer, s, h)).result()


def keys(args: argparse.Namespace) -> int:
    cfg = config_mod.load(args.config)
    vault = _vault(cfg)
    store = SqliteStore(cfg.state_dir)
    try:
        usage = store.key_usage()
        if args.action == "list":
            files = {read_key_file(p, "vault.keys").key_id: p for p in cfg.vault.keys}
            for kid in sorted(vault.key_ids, key=vault.created):
                mark = "current" if kid == vault.current else ""
                print(f"{kid}\t{vault.created(kid) or '-'}\t{usage.get(kid, 0)} object(s)\t{mark}\t{files.get(kid, '')}".rstrip())
            for kid in sorted(set(usage) - set(vault.key_ids)):
                print(f"{kid}\t-\t{usage[kid]} object(s)\tMISSING: no configured key file holds this key")
            return 0
        if args.action == "rotate":
            return _rotate(cfg, store, args)
        if args.action == "rewrap":
            return _rewrap(cfg, vault, store, args, usage)
        return _retire(cfg, vault, store, args, usage)
    finally:
        store.close()


def _rotate(cfg: config_mod.Config, store: SqliteStore, args: argparse.Namespace) -> int:
    folder = cfg.vault.folder
    if folder is None:
        raise ConfigError("vault.keys lists key files, not a folder: list the folder instead (keys = [\"keys\"]) "
                          "so that the daemon finds the keys that `keys rotate` writes there")
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S")
    path = next(p for n in range(1000) if not (p := folder / f"master-{stamp}{f'-{n}' if n else ''}.key").exists())
    key = write_key_file(path)
    _record(cfg, store, args, "keys.rotated", {"key_id": key.key_id})
    print(f"new master key {key.key_id} written to {path} (mode 0600); back it up with the other key files.")
    if cfg.vault.current:
        print(f"warning: vault.current pins {cfg.vault.current}; set it to {key.key_id!r} (or remove it) to use the new key",
              file=sys.stderr)
    print("It seals new invoices once the daemon reloads (systemctl reload einvoice-gateway, or SIGHUP; under systemd "
          "credentials, a restart). Then run `einvoice-gateway keys rewrap` to move stored objects onto it.")
    return 0


def _rewrap(cfg: config_mod.Config, vault: Vault, store: SqliteStore, args: argparse.Namespace, usage: dict[str, int]) -> int:
    old = [k for k in (args.key or usage) if k != vault.current]
    missing = [k for k in old if k not in vault.key_ids]
    if missing:
        raise ConfigError(f"--key: no configured key file holds key {missing[0]!r}")
    sealing = store.get_meta("sealing_key")
    if sealing not in (None, vault.current) and not args.daemon_stopped:
        # Objects re-sealed under a key the daemon has not loaded yet could not be delivered.
        raise ConfigError(f"keys rewrap: the running gateway still seals with {sealing}, not the current key "
                          f"{vault.current}; reload it first (systemctl reload einvoice-gateway, or SIGHUP; under systemd "
                          "credentials, restart), or pass --daemon-stopped if it is not running")
    done = 0
    failed: set[str] = set()
    while old:
        batch = [r for r in store.sealed_under(old, REWRAP_BATCH + len(failed)) if r[0] not in failed][:REWRAP_BATCH]
        if not batch:
            break
        rows = []
        for message_id, sha256, sealed in batch:
            try:
                new, key_id = vault.reseal(sealed, message_id, sha256)
            except VaultError:
                failed.add(message_id)
                print(f"warning: stored object {message_id} does not open (corrupt, or sealed under another key); "
                      "left as it is", file=sys.stderr)
                continue
            rows.append((message_id, sealed, new, key_id))
        done += store.replace_sealed(rows).result() if rows else 0
    _record(cfg, store, args, "keys.rewrapped", {"to": vault.current, "from": old, "objects": done, "failed": len(failed)})
    left = {k: n for k, n in store.key_usage().items() if k != vault.current}
    print(f"{done} object(s) re-sealed under {vault.current}"
          + (f"; still under older keys: {', '.join(f'{k} ({n})' for k, n in sorted(left.items()))}" if left else
             "; no object needs an older key any more (keys retire ID stops loading one)"))
    return 1 if failed else 0


def _retire(cfg: config_mod.Config, vault: Vault, store: SqliteStore, args: argparse.Namespace, usage: dict[str, int]) -> int:
    kid = args.key_id
    if kid not in vault.key_ids:
        raise ConfigError(f"keys retire: no configured key has the id {kid!r}")
    if kid == vault.current:
        raise ConfigError(f"keys retire: {kid} is the current key; rotate first")
    if usage.get(kid):
        raise ConfigError(f"keys retire: {usage[kid]} stored object(s) still need {kid}; run `keys rewrap` first")
    path = next(p for p in cfg.vault.keys if read_key_file(p, "vault.keys").key_id == kid)
    if cfg.vault.folder is None or path.parent != cfg.vault.folder:
        raise ConfigError(f"keys retire: {path} is listed by name in vault.keys; remove it from the list yourself")
    retired = path.with_suffix(".retired")
    path.rename(retired)
    _record(cfg, store, args, "keys.retired", {"key_id": kid})
    print(f"key {kid} retired: {retired} is no longer loaded (keep it in a backup, or destroy it). Reload the daemon.")
    return 0


def trusted_certificates(cfg: config_mod.Config) -> list[Any]:
    """The certificates whose audit checkpoints and export seals are accepted: the current signing key's
    and the earlier ones of audit.trusted_certificates."""
    from cryptography import x509

    paths = ([cfg.signing.certificate] if cfg.signing else []) + list(cfg.operations.audit_trusted)
    return [x509.load_pem_x509_certificate(p.read_bytes()) for p in paths]


def unsealed_limit(cfg: config_mod.Config) -> float | None:
    """The daemon seals the head every checkpoint_interval_s; a longer unsealed stretch means
    checkpoints were removed (allowing for one missed interval and a slow shutdown)."""
    return 2 * cfg.operations.audit_checkpoint_s + 120 if cfg.signing else None


def audit(args: argparse.Namespace) -> int:
    from ..stages.signature import SigningKey

    cfg = config_mod.load(args.config)
    store = SqliteStore(cfg.state_dir)
    try:
        if args.action == "verify":
            trusted = trusted_certificates(cfg)
            if args.file:
                header, records = read_export(Path(args.file), trusted)
                report = audit_mod.verify(records, trusted, starts_at_genesis=header.get("first_seq") in (None, 1))
            else:
                report = audit_mod.verify(store.audit_range(), trusted, max_unsealed_s=unsealed_limit(cfg))
            if args.json:
                print(json.dumps(report.as_dict(), indent=2))
            elif report.ok:
                print(f"audit log OK: {report.records} record(s) {report.first_seq}…{report.last_seq}, "
                      f"{report.checkpoints} signed checkpoint(s)")
            else:
                assert report.problem is not None
                print(f"audit log FAILED at record {report.problem.seq} ({report.problem.kind}): {report.problem.message}")
            for note in report.notes if not args.json else ():
                print(f"note: {note}")
            return 0 if report.ok else 1
        if args.action == "export":
            out = Path(args.output)
            if out.exists():
                raise ConfigError(f"-o: {out} exists; choose a new file name (an export is never overwritten)")
            records = list(store.audit_range(args.from_seq, args.to_seq, args.since, args.until))
            with open(out, "x", encoding="utf-8") as fh:
                fh.write(audit_mod.export_text(records, datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")))
            print(f"{len(records)} record(s) written to {out}; check it with: einvoice-gateway audit verify --file {out}")
            return 0
        if args.action == "checkpoint":
            if cfg.signing is None:
                raise ConfigError("signing: audit checkpoints are signed with the [signing] key, which is not configured")
            signer = SigningKey.load(cfg.signing.certificate.read_bytes(), cfg.signing.private_key.read_bytes())
            seq = store.audit_checkpoint(lambda s, h: audit_mod.checkpoint_detail(signer, s, h)).result()
            print(f"checkpoint {seq} written" if seq else "the head is already a checkpoint")
            return 0
        rows = store.audit_records(args.limit)
        if args.json:
            print(json.dumps(rows, indent=2))
        else:
            for r in rows:
                print(f"{r['seq']}\t{r['at']}\t{r['actor']}\t{r['action']}\t{r['partner'] or ''}\t{r['message_id'] or ''}")
        return 0
    finally:
        store.close()


def read_export(path: Path, trusted: list[Any] | None = None) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The header and records of an export; a sealed one (from the console) must carry a valid seal."""
    try:
        data = path.read_bytes()
        lines = data.decode("utf-8").splitlines()
        header = json.loads(lines[0])
        records = [json.loads(line) for line in lines[1:] if line.strip()]
    except (OSError, UnicodeDecodeError, IndexError, ValueError) as exc:
        raise ConfigError(f"--file: {path} is not an audit export ({exc})") from None
    if not isinstance(header, dict) or header.get("format") != audit_mod.EXPORT_FORMAT:
        raise ConfigError(f"--file: {path} does not start with an {audit_mod.EXPORT_FORMAT} header")
    if records and isinstance(records[-1], dict) and records[-1].get("format") == audit_mod.SEAL_FORMAT:
        seal = records.pop()
        body = data[:data.rstrip(b"\n").rfind(b"\n") + 1]
        problem = audit_mod.check_seal(body, seal, trusted or [])
        if problem is not None:
            raise ConfigError(f"--file: {path}: {problem}")
    return header, records


def backup(args: argparse.Namespace) -> int:
    from ..operations import backup as backup_mod

    cfg = config_mod.load(args.config)
    if args.action == "create":
        manifest = backup_mod.create(cfg.state_dir, Path(args.dest))
        print(f"backup written to {args.dest}: {json.dumps(manifest.get('counts', {}))}; the master keys are not in it "
              f"(it needs {', '.join(manifest.get('key_ids', {})) or 'no key'})")
        return 0
    if args.action == "verify":
        problems = backup_mod.verify(Path(args.src), _vault(cfg) if args.deep else None)
        for p in problems:
            print(f"problem: {p}")
        print("backup OK" if not problems else f"backup FAILED: {len(problems)} problem(s)")
        return 0 if not problems else 1
    target = Path(args.state_dir) if args.state_dir else cfg.state_dir
    backup_mod.restore(Path(args.src), target)
    print(f"restored into {target}; start the gateway on it")
    return 0


def partners_check(args: argparse.Namespace) -> int:
    """Expired and expiring certificates (gateway and partners), and partner certificates' revocation status."""
    from ..operations.housekeeping import expiring, inventory
    from ..partners.directory import load_directory

    cfg = config_mod.load(args.config)
    directory = load_directory(cfg.partners_file)
    horizon = max(cfg.operations.expiry_warn_days, default=30)
    found = expiring(inventory(cfg, directory), horizon)
    problems = 0
    for entry, days in found:
        state = "EXPIRED" if days <= 0 else f"expires in {days:.0f} day(s)"
        problems += days <= 0
        print(f"{entry.owner}\t{entry.purpose}\t{state}\t{entry.not_after:%Y-%m-%d}\t{entry.subject}\t{entry.spki_sha256[:16]}")
    revoked = _revocation_report(cfg, directory)
    problems += revoked
    if not found and not revoked:
        print(f"no certificate expires within {horizon} days")
    return 1 if problems else 0


def _revocation_report(cfg: config_mod.Config, directory: Any) -> int:
    if not cfg.operations.crls:
        return 0
    from ..errors import Forbidden
    from ..stages.revocation import Revocation, RevocationPolicy
    from ..tls import ca_certificates

    cas = ca_certificates(cfg.https.client_ca)
    rev = Revocation(RevocationPolicy(cfg.operations.crls, cfg.operations.crl_soft_fail, cfg.operations.crl_max_age_s), cas)
    bad = 0
    for p in directory.partners:
        for spki in sorted(p.client_spki):
            info = directory.certificates[spki]
            try:
                status = rev.check_peer(info.cert)
            except Forbidden as exc:
                bad += 1
                print(f"{p.name}\tclient\t{exc.code}\t{info.subject}\t{spki[:16]}")
                continue
            if status == "unknown":
                print(f"{p.name}\tclient\tREVOCATION_UNKNOWN (soft-fail)\t{info.subject}\t{spki[:16]}")
    for s in rev.status():
        print(f"crl\t{s['issuer']}\tnext update {s['next_update']}\t{s['revoked']} revoked\t{s['file']}")
    return bad

