"""container/readyz.py, the image's health check, run as the image runs it (a separate Python process)
against a gateway serving in this process: plain HTTP on loopback, HTTPS with the bearer token on
another address, and "not ready" with the reason when the token is wrong or nothing listens."""

from __future__ import annotations

import asyncio
import secrets
import socket
import sys
from pathlib import Path

from gateway.operations import instance
from tests.helpers import ROOT, rewrite_config, serving

PROBE = ROOT / "container" / "readyz.py"


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def with_admin(inst: instance.Instance, host: str, token: str | None = None) -> int:
    port = free_port(host)

    def admin(data: dict) -> None:
        data["admin"] = {"listen_host": host, "listen_port": port}
        if token is not None:
            token_file = inst.root / "keys" / "admin.token"
            token_file.write_text(token + "\n")
            token_file.chmod(0o600)
            data["admin"]["token_file"] = "keys/admin.token"

    rewrite_config(inst.config, admin)
    return port


async def probe(config: Path) -> tuple[int, str]:
    proc = await asyncio.create_subprocess_exec(sys.executable, str(PROBE), str(config), stdout=asyncio.subprocess.PIPE)
    out, _ = await asyncio.wait_for(proc.communicate(), 30)
    return proc.returncode or 0, out.decode().strip()


async def test_ready_on_loopback_without_a_token(inst: instance.Instance) -> None:
    with_admin(inst, "127.0.0.1")
    async with serving(inst):
        assert await probe(inst.config) == (0, "ready")


async def test_https_with_the_token_on_another_address(inst: instance.Instance) -> None:
    # 127.0.0.2 is a loopback interface address, but not one the gateway treats as loopback: HTTPS and a token.
    with_admin(inst, "127.0.0.2", token=secrets.token_urlsafe(24))
    async with serving(inst):
        assert await probe(inst.config) == (0, "ready")


async def test_a_wrong_token_is_not_ready_and_says_why(inst: instance.Instance) -> None:
    with_admin(inst, "127.0.0.2", token=secrets.token_urlsafe(24))
    async with serving(inst):
        (inst.root / "keys" / "admin.token").write_text(secrets.token_urlsafe(24))
        code, said = await probe(inst.config)
    assert code == 1 and said == "not ready: /readyz answered 401", said


async def test_nothing_listening_is_not_ready(inst: instance.Instance) -> None:
    port = with_admin(inst, "127.0.0.1")
    code, said = await probe(inst.config)
    assert code == 1 and said.startswith(f"not ready: no answer from the admin listener at 127.0.0.1:{port}"), said


async def test_an_unreadable_configuration_is_not_ready(tmp_path: Path) -> None:
    code, said = await probe(tmp_path / "missing.toml")
    assert code == 1 and said.startswith(f"not ready: cannot read {tmp_path / 'missing.toml'}"), said
