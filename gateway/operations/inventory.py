"""What an instance consists of on disk, read from its configuration: what a backup must take.

Every path the configuration names is found by walking its frozen sections (gateway/config/model.py),
so a key added there is backed up without a list to keep in step; the partners file adds the
certificates it names.  Each path is sorted by what it is:

    files     copied: the configuration, the partners file, certificates, CA bundles, CRLs, private
              keys and other secrets (tokens, HMAC keys), a private key kept beside a certificate
              under the same name (``ca.crt`` + ``ca.key``: the development CA's), master keys
    folders   made again (empty) at a restore: the ERP's inbox folders, the master key folder
    external  named but not copied: operator-supplied schema folders and rule packs, which come
              with software, not with the instance; a restore checks that they exist

The database in ``state_dir`` is not among them: a backup takes it as a consistent snapshot.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass, fields, is_dataclass
from pathlib import Path

from ..config.model import Config
from ..partners.book import PURPOSES, load_directory

# Kinds of file, as the manifest names them.
CONFIGURATION, PARTNERS, FILE, SECRET, MASTER_KEY = "configuration", "partners", "file", "secret", "master key"
ERP_FOLDER, KEY_FOLDER = "ERP folder", "master key folder"

# Fields of the configuration's sections that name secrets (read with Reader.secret in gateway/config/load.py).
SECRET_FIELDS = frozenset({"private_key", "client_key", "hmac_key_file", "bearer_token_file", "password_file", "token_file"})
_EXTERNAL = re.compile(r"(schemas|rule_packs)\[\d+\]\..*|cii_schema")  # software the operator installs, not state
_NOT_FILES = re.compile(r"state_dir|outbound\.socket")  # the snapshot's; a socket the daemon makes


@dataclass(frozen=True, slots=True)
class Item:
    key: str  # where it is named: "https.private_key", "vault.keys[0]", "partners.acme.client_certs[0]"
    path: Path  # absolute
    kind: str


@dataclass(frozen=True, slots=True)
class Inventory:
    config_dir: Path  # the configuration file's folder: paths below it are recorded relative to it
    state_dir: Path
    files: tuple[Item, ...]
    folders: tuple[Item, ...]
    external: tuple[Item, ...]


def inventory(cfg: Config) -> Inventory:
    """Everything ``cfg`` names on disk, each path once (the first key naming it), in the order named."""
    files: dict[Path, Item] = {}
    folders: dict[Path, Item] = {}
    external: dict[Path, Item] = {}
    for key, path in _paths(cfg, ""):
        path = path.absolute()
        if _NOT_FILES.fullmatch(key):
            continue
        if _EXTERNAL.fullmatch(key):
            external.setdefault(path, Item(key, path, "external"))
        elif re.fullmatch(r"destinations\[\d+\]\.path", key):
            folders.setdefault(path, Item(key, path, ERP_FOLDER))
        elif key == "vault.folder":
            folders.setdefault(path, Item(key, path, KEY_FOLDER))
        elif path.is_file():
            files.setdefault(path, Item(key, path, _kind(key)))
    for partner in load_directory(cfg.partners_file).partners:
        for field in PURPOSES.values():
            for i, cert in enumerate(getattr(partner, field)):
                path = Path(cert).absolute()
                files.setdefault(path, Item(f"partners.{partner.name}.{field}[{i}]", path, FILE))
    for item in list(files.values()):  # a private key beside a certificate, under its name (devpki's layout)
        beside = item.path.with_suffix(".key")
        if item.kind == FILE and item.path.suffix in (".crt", ".pem") and beside.is_file() and beside not in files:
            files[beside] = Item(f"{item.key} (its private key)", beside, SECRET)
    return Inventory(cfg.source.parent, cfg.state_dir.absolute(), tuple(files.values()), tuple(folders.values()),
                     tuple(external.values()))


def _kind(key: str) -> str:
    if key == "source":
        return CONFIGURATION
    if key == "partners_file":
        return PARTNERS
    if key.startswith("vault.keys["):
        return MASTER_KEY
    return SECRET if key.rpartition(".")[2] in SECRET_FIELDS else FILE


def _paths(value: object, key: str) -> Iterator[tuple[str, Path]]:
    """(key path, path) of every Path in a configuration value, depth first."""
    if isinstance(value, Path):
        yield key, value
    elif is_dataclass(value) and not isinstance(value, type):
        for f in fields(value):
            yield from _paths(getattr(value, f.name), f"{key}.{f.name}" if key else f.name)
    elif isinstance(value, tuple | list):
        for i, v in enumerate(value):
            yield from _paths(v, f"{key}[{i}]")
