"""``einvoice-gateway backup …``: snapshots of an instance (state, configuration, PKI), checked and restored."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from ..config.load import load
from ..operations import backup as backup_mod
from ..operations.inventory import inventory
from ..storage.factory import snapshots
from .common import DEFAULT_CONFIG, with_config
from .errors import Refused, said_as
from .keys import vault_of
from .progress import Progress

KEYS_WARNING = ("warning: --include-master-keys: this backup holds the master keys, so whoever can read it can decrypt "
                "every invoice in it. Guard it like the keys themselves: encrypted, offline, never beside other copies "
                "of the database.")


def add_parsers(sub: Any) -> None:
    b = sub.add_parser("backup", help="snapshots of an instance: its state, configuration, partners and PKI")
    bsub = b.add_subparsers(dest="action", required=True)
    bc = with_config(bsub.add_parser("create", help="snapshot the database and copy every file the configuration names "
                                                    "(safe while running)"))
    bc.add_argument("dest", help="a new folder for the backup")
    bc.add_argument("--include-master-keys", action="store_true",
                    help="also copy the vault's master keys: the backup then decrypts everything and must be guarded like "
                         "the keys (default: they are left out; back them up separately)")
    bv = with_config(bsub.add_parser("verify", help="check a backup's manifest, hashes and integrity"))
    bv.add_argument("src", help="the backup's folder")
    bv.add_argument("--deep", action="store_true", help="also open every stored object with the configured keys")
    br = bsub.add_parser("restore", help="put a backup's files and database back (refuses to replace an existing "
                                         "instance unless --overwrite)")
    br.add_argument("-c", "--config", default=DEFAULT_CONFIG,
                    help="only for a backup of the database alone (format 1): the configuration naming its state_dir "
                         f"(default {DEFAULT_CONFIG}); a full backup brings its own")
    br.add_argument("src", help="the backup's folder")
    br.add_argument("--config-dir", help="restore the configuration folder's files here instead of where they were "
                                         "(a new folder: the restored configuration's relative paths follow)")
    br.add_argument("--state-dir", help="restore the database here instead of the configuration's state_dir (the "
                                        "restored configuration is changed to name it)")
    br.add_argument("--overwrite", action="store_true",
                    help="replace files and a database that differ from the backup (stop the gateway first)")


def run(args: argparse.Namespace) -> int:
    with Progress.for_command(args) as progress:
        if args.action == "create":
            return _create(args, progress)
        if args.action == "verify":
            cfg = load(args.config)
            problems = backup_mod.verify(snapshots(cfg), Path(args.src), vault_of(cfg) if args.deep else None, progress)
            progress.finish()
            for p in problems:
                print(f"problem: {p}")
            print("backup OK" if not problems else f"backup FAILED: {len(problems)} problem(s)")
            return 0 if not problems else 1
        return _restore(args, progress)


def _create(args: argparse.Namespace, progress: Progress) -> int:
    cfg = load(args.config)
    if args.include_master_keys:
        print(KEYS_WARNING, file=sys.stderr)
    with said_as(Refused):
        manifest = backup_mod.create(snapshots(cfg), cfg.state_dir, Path(args.dest), instance=inventory(cfg),
                                     master_keys=args.include_master_keys, tick=progress)
    progress.finish()
    files = manifest["instance"]["files"]
    needs = ", ".join(manifest.get("key_ids", {})) or "no key"
    print(f"backup written to {args.dest}: {json.dumps(manifest.get('counts', {}))}; {len(files)} file(s) of the instance")
    if args.include_master_keys:
        print(f"the master keys are IN it ({needs}): it decrypts every invoice; guard it like the keys")
        print(KEYS_WARNING, file=sys.stderr)
    else:
        print(f"the master keys are not in it (it needs {needs}): back up their files separately")
    return 0


def _restore(args: argparse.Namespace, progress: Progress) -> int:
    src = Path(args.src)
    state = Path(args.state_dir) if args.state_dir else None
    manifest = backup_mod.manifest_of(src)
    if state is None and manifest is not None and "instance" not in manifest:
        state = load(args.config).state_dir  # a backup of the database alone: the configuration says where
    with said_as(Refused):
        done = backup_mod.restore(snapshots(), src, state, config_dir=Path(args.config_dir) if args.config_dir else None,
                                  overwrite=args.overwrite, tick=progress)
    progress.finish()
    if done.config is None:
        print(f"restored into {done.state_dir}; start the gateway on it")
        return 0
    print(f"restored {done.config} and the instance's files ({done.files} written), the database into {done.state_dir}")
    if done.missing_keys:
        print("the master keys are not in this backup: put their key files back (mode 0600) before starting the gateway:")
        for key_id, path in done.missing_keys:
            print(f"  master key {key_id}: {path}")
    for key, path in done.missing_external:
        print(f"not in any backup and missing here: {key} = {path}; install it, or change the configuration")
    print(f"then check it: einvoice-gateway check-config -c {done.config}")
    return 0
