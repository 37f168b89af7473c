"""``einvoice-gateway keys …``: master keys — list, rotate, rewrap stored objects, retire.

They work on the key files and the instance's store directly, so they run beside the daemon (as root
or as the service's user); each change is an audit record naming who did it, sealed at once.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from datetime import UTC, datetime
from typing import Any

from ..config.load import load
from ..config.model import Config
from ..errors import ConfigError, VaultError
from ..operations.audit import record
from ..storage.base import Store
from ..storage.records import Resealed
from ..vault import Vault, read_key_file, write_key_file
from .common import actor, opened, with_by, with_config, with_json
from .errors import NotFound, Refused
from .output import Column, listing
from .progress import Progress

REWRAP_BATCH = 200  # objects re-sealed per transaction: the daemon's writes wait at most one batch


def add_parsers(sub: Any) -> None:
    k = sub.add_parser("keys", help="master keys: list, rotate, rewrap stored objects, retire")
    ksub = k.add_subparsers(dest="action", required=True)
    with_json(with_config(ksub.add_parser("list", help="key ids, creation dates and how many stored objects each protects")))
    with_config(ksub.add_parser("rotate", help="write a new master key, current for new invoices after a reload"))
    rw = with_config(ksub.add_parser("rewrap", help="re-seal objects stored under older keys with the current key "
                                     "(safe while the daemon runs)"))
    rw.add_argument("--key", action="append", default=[], help="only objects under this key id (default: every older key)")
    rw.add_argument("--daemon-stopped", action="store_true",
                    help="the gateway is not running: do not require it to seal with the current key already")
    rt = with_config(ksub.add_parser("retire", help="stop loading a key that no stored object needs any more"))
    rt.add_argument("key_id", help="the key's id (keys list shows them)")
    for action in ("rotate", "rewrap", "retire"):
        with_by(ksub.choices[action])


def vault_of(cfg: Config) -> Vault:
    return Vault.from_files(cfg.vault.keys, cfg.vault.current)


def run(args: argparse.Namespace) -> int:
    cfg = load(args.config)
    return asyncio.run(_keys(cfg, vault_of(cfg), args))


async def _record(cfg: Config, store: Store, args: argparse.Namespace, action: str, detail: dict[str, Any]) -> None:
    await record(cfg, store.audit, actor(args.by), action, None, detail)


async def _keys(cfg: Config, vault: Vault, args: argparse.Namespace) -> int:
    async with opened(cfg) as store:
        usage = await store.keys.usage()
        if args.action == "list":
            return listing(_listed(cfg, vault, usage), args.json, KEYS, "no master keys", dict)
        if args.action == "rotate":
            return await _rotate(cfg, store, args)
        if args.action == "rewrap":
            return await _rewrap(cfg, vault, store, args, usage)
        return await _retire(cfg, vault, store, args, usage)


KEYS: list[Column[dict[str, Any]]] = [
    ("key id", lambda k: k["key_id"]), ("created", lambda k: k["created"]), ("objects", lambda k: k["objects"]),
    ("state", lambda k: "MISSING: no configured key file holds this key" if k["missing"] else
     "current" if k["current"] else ""), ("file", lambda k: k["file"])]


def _listed(cfg: Config, vault: Vault, usage: dict[str, int]) -> list[dict[str, Any]]:
    """The configured keys, oldest first, then any key stored objects need that no configured file holds."""
    files = {read_key_file(p, "vault.keys").key_id: p for p in cfg.vault.keys}
    keys = [{"key_id": kid, "created": vault.created(kid), "objects": usage.get(kid, 0), "current": kid == vault.current,
             "missing": False, "file": str(files[kid]) if kid in files else None}
            for kid in sorted(vault.key_ids, key=vault.created)]
    return keys + [{"key_id": kid, "created": None, "objects": usage[kid], "current": False, "missing": True, "file": None}
                   for kid in sorted(set(usage) - set(vault.key_ids))]


async def _rotate(cfg: Config, store: Store, args: argparse.Namespace) -> int:
    folder = cfg.vault.folder
    if folder is None:
        raise ConfigError("vault.keys lists key files, not a folder: list the folder instead (keys = [\"keys\"]) "
                          "so that the daemon finds the keys that `keys rotate` writes there")
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S")
    path = next(p for n in range(1000) if not (p := folder / f"master-{stamp}{f'-{n}' if n else ''}.key").exists())
    key = write_key_file(path)
    await _record(cfg, store, args, "keys.rotated", {"key_id": key.key_id})
    print(f"new master key {key.key_id} written to {path} (mode 0600); back it up with the other key files.")
    if cfg.vault.current:
        print(f"warning: vault.current pins {cfg.vault.current}; set it to {key.key_id!r} (or remove it) to use the new key",
              file=sys.stderr)
    print("It seals new invoices once the daemon reloads (systemctl reload einvoice-gateway, or SIGHUP; under systemd "
          "credentials, a restart). Then run `einvoice-gateway keys rewrap` to move stored objects onto it.")
    return 0


async def _rewrap(cfg: Config, vault: Vault, store: Store, args: argparse.Namespace, usage: dict[str, int]) -> int:
    old = [k for k in (args.key or usage) if k != vault.current]
    missing = [k for k in old if k not in vault.key_ids]
    if missing:
        raise NotFound(f"--key: no configured key file holds key {missing[0]!r}")
    sealing = await store.keys.sealing_key()
    if sealing not in (None, vault.current) and not args.daemon_stopped:
        # Objects re-sealed under a key the daemon has not loaded yet could not be delivered.
        raise Refused(f"keys rewrap: the running gateway still seals with {sealing}, not the current key "
                          f"{vault.current}; reload it first (systemctl reload einvoice-gateway, or SIGHUP; under systemd "
                          "credentials, restart), or pass --daemon-stopped if it is not running")
    done = 0
    failed: set[str] = set()
    total = sum(usage.get(k, 0) for k in old)
    with Progress.for_command(args) as progress:
        while old:
            batch = [r for r in await store.keys.sealed_under(old, REWRAP_BATCH + len(failed))
                     if r.message_id not in failed][:REWRAP_BATCH]
            if not batch:
                break
            rows = []
            for obj in batch:
                try:
                    new, key_id = vault.reseal(obj.sealed, obj.message_id, obj.sha256)
                except VaultError:
                    failed.add(obj.message_id)
                    progress.finish()  # the warning on a line of its own
                    print(f"warning: stored object {obj.message_id} does not open (corrupt, or sealed under another key); "
                          "left as it is", file=sys.stderr)
                    continue
                rows.append(Resealed(obj.message_id, obj.sealed, new, key_id))
            done += await store.keys.replace_sealed(rows) if rows else 0
            progress.update("re-sealing stored objects", done + len(failed), max(total, done + len(failed)))
    await _record(cfg, store, args, "keys.rewrapped", {"to": vault.current, "from": old, "objects": done, "failed": len(failed)})
    left = {k: n for k, n in (await store.keys.usage()).items() if k != vault.current}
    print(f"{done} object(s) re-sealed under {vault.current}"
          + (f"; still under older keys: {', '.join(f'{k} ({n})' for k, n in sorted(left.items()))}" if left else
             "; no object needs an older key any more (keys retire ID stops loading one)"))
    return 1 if failed else 0


async def _retire(cfg: Config, vault: Vault, store: Store, args: argparse.Namespace, usage: dict[str, int]) -> int:
    kid = args.key_id
    if kid not in vault.key_ids:
        raise NotFound(f"keys retire: no configured key has the id {kid!r} (see: einvoice-gateway keys list)")
    if kid == vault.current:
        raise Refused(f"keys retire: {kid} is the current key; rotate first")
    if usage.get(kid):
        raise Refused(f"keys retire: {usage[kid]} stored object(s) still need {kid}; run `keys rewrap` first")
    path = next(p for p in cfg.vault.keys if read_key_file(p, "vault.keys").key_id == kid)
    if cfg.vault.folder is None or path.parent != cfg.vault.folder:
        raise Refused(f"keys retire: {path} is listed by name in vault.keys; remove it from the list yourself")
    retired = path.with_suffix(".retired")
    path.rename(retired)
    await _record(cfg, store, args, "keys.retired", {"key_id": kid})
    print(f"key {kid} retired: {retired} is no longer loaded (keep it in a backup, or destroy it). Reload the daemon.")
    return 0
