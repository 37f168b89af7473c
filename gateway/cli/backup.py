"""``einvoice-gateway backup …``: consistent, still-encrypted snapshots of the instance's state, checked and restored."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from ..config.load import load
from ..operations import backup as backup_mod
from ..storage.factory import snapshots
from .common import with_config
from .errors import Refused, said_as
from .keys import vault_of


def add_parsers(sub: Any) -> None:
    b = sub.add_parser("backup", help="consistent, still-encrypted snapshots of the state directory")
    bsub = b.add_subparsers(dest="action", required=True)
    bc = with_config(bsub.add_parser("create", help="snapshot the index and the encrypted store (safe while running)"))
    bc.add_argument("dest", help="a new folder for the backup")
    bv = with_config(bsub.add_parser("verify", help="check a backup's manifest, hashes and integrity"))
    bv.add_argument("src", help="the backup's folder")
    bv.add_argument("--deep", action="store_true", help="also open every stored object with the configured keys")
    br = with_config(bsub.add_parser("restore", help="restore a backup into an empty state directory"))
    br.add_argument("src", help="the backup's folder")
    br.add_argument("--state-dir", help="where to restore (default: instance.state_dir of the configuration)")


def run(args: argparse.Namespace) -> int:
    cfg = load(args.config)
    copies = snapshots(cfg)
    if args.action == "create":
        with said_as(Refused):
            manifest = backup_mod.create(copies, cfg.state_dir, Path(args.dest))
        print(f"backup written to {args.dest}: {json.dumps(manifest.get('counts', {}))}; the master keys are not in it "
              f"(it needs {', '.join(manifest.get('key_ids', {})) or 'no key'})")
        return 0
    if args.action == "verify":
        problems = backup_mod.verify(copies, Path(args.src), vault_of(cfg) if args.deep else None)
        for p in problems:
            print(f"problem: {p}")
        print("backup OK" if not problems else f"backup FAILED: {len(problems)} problem(s)")
        return 0 if not problems else 1
    target = Path(args.state_dir) if args.state_dir else cfg.state_dir
    with said_as(Refused):
        backup_mod.restore(copies, Path(args.src), target)
    print(f"restored into {target}; start the gateway on it")
    return 0
