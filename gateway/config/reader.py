"""Typed access to TOML tables that remembers each key's path, and the rules for secret files."""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

from ..errors import ConfigError


class Reader:
    """Typed access to one TOML table that remembers its key path and refuses unknown keys."""

    def __init__(self, data: Any, path: str, base: Path):
        if not isinstance(data, dict):
            raise ConfigError(f"{path or '(top level)'}: expected a table")
        self._data = data
        self._path = path
        self._seen: set[str] = set()
        self.base = base

    def key(self, name: str) -> str:
        return f"{self._path}.{name}" if self._path else name

    def has(self, name: str) -> bool:
        return name in self._data

    def _get(self, name: str, default: Any, required: bool) -> Any:
        self._seen.add(name)
        if name not in self._data:
            if required:
                raise ConfigError(f"{self.key(name)}: missing (required)")
            return default
        return self._data[name]

    def string(self, name: str, default: str | None = None, *, required: bool = False) -> str:
        value = self._get(name, default, required)
        if not isinstance(value, str):
            raise ConfigError(f"{self.key(name)}: expected a string, got {type(value).__name__}")
        return value

    def integer(self, name: str, default: int, *, minimum: int = 0, maximum: int | None = None) -> int:
        value = self._get(name, default, False)
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{self.key(name)}: expected an integer, got {value!r}")
        if value < minimum or (maximum is not None and value > maximum):
            bound = f"between {minimum} and {maximum}" if maximum is not None else f">= {minimum}"
            raise ConfigError(f"{self.key(name)}: {value} is out of range (must be {bound})")
        return value

    def number(self, name: str, default: float, *, minimum: float = 0.0) -> float:
        value = self._get(name, default, False)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{self.key(name)}: expected a number, got {value!r}")
        if not value >= minimum or value == math.inf:  # (nan compares false with everything)
            raise ConfigError(f"{self.key(name)}: {value} is out of range (must be >= {minimum}, and finite)")
        return float(value)

    def boolean(self, name: str, default: bool) -> bool:
        value = self._get(name, default, False)
        if not isinstance(value, bool):
            raise ConfigError(f"{self.key(name)}: expected true or false, got {value!r}")
        return value

    def str_list(self, name: str, *, required: bool = False) -> list[str]:
        value = self._get(name, [], required)
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise ConfigError(f"{self.key(name)}: expected a list of strings")
        return list(value)

    def int_list(self, name: str, default: list[int], minimum: int, maximum: int) -> list[int]:
        value = self._get(name, default, False)
        if not isinstance(value, list) or not all(
                isinstance(v, int) and not isinstance(v, bool) and minimum <= v <= maximum for v in value):
            raise ConfigError(f"{self.key(name)}: expected a list of whole numbers between {minimum} and {maximum}")
        return list(value)

    def choice(self, name: str, choices: tuple[str, ...], default: str) -> str:
        value = self.string(name, default)
        if value not in choices:
            raise ConfigError(f"{self.key(name)}: {value!r} is not one of {', '.join(choices)}")
        return value

    def resolve(self, value: str) -> Path:
        p = Path(value).expanduser()
        return p if p.is_absolute() else (self.base / p)

    def file(self, name: str, value: str | None = None, index: int | None = None) -> Path:
        """A path that must name an existing regular file."""
        raw = value if value is not None else self.string(name, required=True)
        where = self.key(name) + (f"[{index}]" if index is not None else "")
        p = self.resolve(raw)
        if not p.exists():
            raise ConfigError(f"{where}: file not found ({p})")
        if not p.is_file():
            raise ConfigError(f"{where}: not a regular file ({p})")
        return p

    def secret(self, name: str) -> Path:
        """A secret file: read from the systemd credential of the same name when the service has one
        (LoadCredential=), else from the path; refused if group or others can read it."""
        p = credential(self.file(name))
        check_secret_file(p, self.key(name))
        return p

    def files(self, name: str, *, required: bool = False) -> tuple[Path, ...]:
        values = self.str_list(name, required=required)
        if required and not values:
            raise ConfigError(f"{self.key(name)}: must name at least one file")
        return tuple(self.file(name, v, i) for i, v in enumerate(values))

    def entries(self, name: str) -> list[str | Reader]:
        """A list whose items are strings or tables (each table a Reader with its own key path)."""
        value = self._get(name, [], False)
        if not isinstance(value, list) or not all(isinstance(v, (str, dict)) for v in value):
            raise ConfigError(f"{self.key(name)}: expected a list of strings or tables")
        return [v if isinstance(v, str) else Reader(v, f"{self.key(name)}[{i}]", self.base) for i, v in enumerate(value)]

    def table(self, name: str) -> Reader:
        return Reader(self._get(name, {}, False), self.key(name), self.base)

    def tables(self, name: str) -> list[Reader]:
        value = self._get(name, [], False)
        if not isinstance(value, list):
            raise ConfigError(f"{self.key(name)}: expected an array of tables ([[{name}]])")
        return [Reader(v, f"{self.key(name)}[{i}]", self.base) for i, v in enumerate(value)]

    def done(self) -> None:
        unknown = sorted(set(self._data) - self._seen)
        if unknown:
            raise ConfigError(f"{self.key(unknown[0])}: unknown key (check the spelling)")


def credential(path: Path) -> Path:
    """The copy systemd gave the service (LoadCredential=NAME:PATH puts it at $CREDENTIALS_DIRECTORY/NAME)
    of the file named ``path``, if the service has a credential of that name; else ``path``."""
    directory = os.environ.get("CREDENTIALS_DIRECTORY")
    if directory:
        # LoadCredential=NAME:FILE gives NAME; a folder loaded as LoadCredential=DIR:FOLDER gives DIR_NAME.
        for copy in (Path(directory) / path.name, Path(directory) / f"{path.parent.name}_{path.name}"):
            if copy.is_file():
                return copy
    return path


def key_files(entry: Path, where: str) -> list[Path]:
    """A master key entry: one file, or a folder whose ``*.key`` files are all master keys.  Under
    systemd, a folder given as LoadCredential=NAME:FOLDER arrives as credentials NAME_<file>."""
    directory = os.environ.get("CREDENTIALS_DIRECTORY")
    if directory and not entry.suffix:
        copies = sorted(Path(directory).glob(f"{entry.name}_*.key"))
        if copies:
            return copies
    if entry.is_dir():
        found = sorted(entry.glob("*.key"))
        if not found:
            raise ConfigError(f"{where}: the folder {entry} holds no *.key file")
        return found
    if not entry.is_file():
        raise ConfigError(f"{where}: file not found ({entry})")
    return [credential(entry)]


def check_secret_file(path: Path, key: str) -> None:
    """Refuse key files that group or others can read, or that belong to another user (K-03).
    A systemd credential is exempt: systemd gives the service alone access to its credentials
    (by ownership, or by an ACL on a root-owned 0440 file when it cannot use its own file system)."""
    credentials = os.environ.get("CREDENTIALS_DIRECTORY")
    if credentials and path.parent == Path(credentials):
        return
    st = path.stat()
    if st.st_mode & 0o077:
        raise ConfigError(
            f"{key}: {path} is accessible by group or others (mode {st.st_mode & 0o777:04o}); "
            f"run: chmod 600 {path}"
        )
    euid = os.geteuid()
    if euid != 0 and st.st_uid not in (euid, 0):
        raise ConfigError(f"{key}: {path} belongs to uid {st.st_uid}, not to the gateway's user ({euid})")
