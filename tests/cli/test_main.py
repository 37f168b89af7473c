"""The command line: init, partners, hot reload of the partners file, serve and demo as real processes."""

from __future__ import annotations

import asyncio
import json
import shlex
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from gateway import devpki
from gateway.cli.demo import SAMPLE
from gateway.files import atomic_write
from gateway.operations import instance
from gateway.partners.book import load_directory
from gateway.tls import inspect_certificate
from tests.helpers import ENV, FOREIGN, FOREIGN_IDS, eventually, free_port, post, run_cli, run_command, wait_for_port
from tests.helpers.daemon import post_many

# --- init -----------------------------------------------------------------------------------------


def test_init_json(tmp_path, capsys):
    code, out, _ = run_command(capsys, "init", str(tmp_path / "gw"), "--port", "18443", "--json")
    assert code == 0
    info = json.loads(out)  # the whole output is one JSON object
    assert info["https_url"] == "https://127.0.0.1:18443"
    assert info["console_url"] == "http://localhost:18445/console/" and info["console_user"] == "admin"
    assert info["console_password_file"] == str(Path(info["state_dir"]) / "console-bootstrap-password")
    for name in ("config_file", "ca_certificate", "ca_key", "demo_partner_client_certificate",
                 "demo_partner_client_key", "master_key_file"):
        assert Path(info[name]).is_file(), name
    assert Path(info["delivery_folder"]).is_dir()
    for name in ("master_key_file", "ca_key", "demo_partner_client_key"):
        assert Path(info[name]).stat().st_mode & 0o777 == 0o600, name
    assert run_command(capsys, "check-config", "-c", info["config_file"])[0] == 0


def test_init_refuses_non_empty_dir(tmp_path, capsys):
    target = tmp_path / "gw"
    target.mkdir()
    (target / "keep.txt").write_text("mine")
    code, out, err = run_command(capsys, "init", str(target), "--json")
    assert code == 2 and out == ""
    assert "not empty" in err
    assert [p.name for p in target.iterdir()] == ["keep.txt"]


# --- partners -------------------------------------------------------------------------------------


def test_partners_lifecycle(inst, tmp_path, capsys):
    cfg = str(inst.config)
    cert = devpki.issue(inst.ca, tmp_path / "acme-pki", "acme", role="client").cert
    code, _, err = run_command(capsys, "partners", "add", "acme", "--client-cert", str(cert), "--party-id", "0088:123",
                       "--party-id", "DE999", "--email", "a@b.example", "-c", cfg)
    assert code == 0, err

    code, out, _ = run_command(capsys, "partners", "list", "-c", cfg)
    assert code == 0
    assert "acme\tactive\t1 cert(s)\t0088:123, DE999" in out.splitlines()
    assert any(line.startswith("demo-supplier\tactive") for line in out.splitlines())

    code, out, _ = run_command(capsys, "partners", "show", "acme", "-c", cfg)
    shown = json.loads(out)
    assert code == 0
    assert (shown["name"], shown["status"]) == ("acme", "active")
    assert (shown["party_ids"], shown["emails"]) == (["0088:123", "DE999"], ["a@b.example"])
    [stored] = shown["client_certs"]
    assert stored["spki_sha256"] == inspect_certificate(cert, "test").spki_sha256
    assert Path(stored["path"]).is_file() and Path(stored["path"]).parent == inst.root / "partner-certs"

    def status() -> str:
        return json.loads(run_command(capsys, "partners", "show", "acme", "-c", cfg)[1])["status"]

    assert run_command(capsys, "partners", "suspend", "acme", "-c", cfg)[0] == 0
    assert status() == "suspended"
    assert "acme\tsuspended" in run_command(capsys, "partners", "list", "-c", cfg)[1]
    assert run_command(capsys, "partners", "resume", "acme", "-c", cfg)[0] == 0
    assert status() == "active"

    code, _, err = run_command(capsys, "partners", "add", "acme", "--client-cert", str(cert), "--party-id", "0088:777", "-c", cfg)
    assert code == 2 and "exists already" in err

    assert run_command(capsys, "partners", "remove", "acme", "-c", cfg)[0] == 0
    assert "acme" not in run_command(capsys, "partners", "list", "-c", cfg)[1]
    code, _, err = run_command(capsys, "partners", "show", "acme", "-c", cfg)
    assert code == 2 and "no partner named 'acme'" in err
    assert [p.name for p in load_directory(inst.partners).partners] == ["demo-supplier"]


@pytest.mark.parametrize("party_id", ["DE123456789", " 0088:4000001000006 "])
def test_partners_add_refuses_identifier_of_another_partner(inst, tmp_path, capsys, party_id):
    before = inst.partners.read_bytes()
    cert = devpki.issue(inst.ca, tmp_path / "rival-pki", "rival", role="client").cert
    code, _, err = run_command(capsys, "partners", "add", "rival", "--client-cert", str(cert), "--party-id", "0088:555",
                       "--party-id", party_id, "-c", str(inst.config))
    assert code == 2
    assert "already registered for partner 'demo-supplier'" in err
    assert inst.partners.read_bytes() == before


def test_partners_add_refuses_certificate_of_another_partner(inst, capsys):
    before = inst.partners.read_bytes()
    code, _, err = run_command(capsys, "partners", "add", "clone", "--client-cert", str(inst.demo_client.cert),
                       "--party-id", "0088:555", "-c", str(inst.config))
    assert code == 2 and "demo-supplier" in err
    assert inst.partners.read_bytes() == before


# --- hot reload in a running gateway ----------------------------------------------------------------


async def test_added_partner_takes_effect_without_restart(gateway, client):
    newco = gateway.issue_client("newco")
    status, reply = await post(client(newco.cert, newco.key), FOREIGN)
    assert (status, reply["error"]) == (403, "PARTNER_UNKNOWN")

    argv = ["partners", "add", "newco", "--client-cert", str(newco.cert), "-c", str(gateway.inst.config)]
    for pid in FOREIGN_IDS:
        argv += ["--party-id", pid]
    assert await run_cli(*argv) == 0

    book = gateway.gw.parts.partners
    await eventually(lambda: book.current.get("newco") is not None, "the running gateway to pick up the new partner", 3.0)

    status, reply = await post(client(newco.cert, newco.key), FOREIGN)
    assert status == 202, reply
    status, _ = await post(client(), SAMPLE)  # the demo partner is still there
    assert status == 202


async def test_invalid_partners_file_keeps_old_directory(gateway, client, log_stream):
    book = gateway.gw.parts.partners
    before = book.current
    broken = b"[[partners]]\nname = 'broken'\n"  # lacks every required key
    await asyncio.to_thread(atomic_write, gateway.inst.partners, broken)

    await eventually(lambda: "partners.reload_failed" in log_stream.getvalue(), "partners.reload_failed in the log", 3.0)
    assert book.current is before
    status, reply = await post(client(), SAMPLE)
    assert status == 202, reply


# --- serve and demo as real processes ---------------------------------------------------------------


def test_serve_subprocess(tmp_path):
    port = free_port()
    inst = instance.init(tmp_path / "gw", port=port)
    proc = subprocess.Popen([sys.executable, "-m", "gateway", "serve", "-c", str(inst.config)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)
    try:
        wait_for_port(port, proc)
        [(status, reply)] = asyncio.run(post_many(inst, [SAMPLE]))
        assert status == 202, reply
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, err
    events = [json.loads(line) for line in out.splitlines() if line.strip()]
    assert events and all(isinstance(e, dict) for e in events)
    accepted = [e for e in events if e.get("event") == "invoice.accepted"]
    assert len(accepted) == 1
    assert accepted[0]["message_id"] == reply["message_id"]
    assert accepted[0]["partner"] == instance.DEMO_PARTNER
    started = [e for e in events if e.get("event") == "gateway.started"]
    stopped = [e for e in events if e.get("event") == "gateway.stopped"]
    assert started and len(stopped) == len(started)  # every worker process stopped cleanly
    supervised = any(e.get("event") == "supervisor.started" for e in events)
    assert events[-1]["event"] == ("supervisor.stopped" if supervised else "gateway.stopped")


def test_demo_no_wait(tmp_path):
    folder = tmp_path / "demo"
    result = subprocess.run([sys.executable, "-m", "gateway", "demo", "--no-wait", "--dir", str(folder)],
                            capture_output=True, text=True, timeout=60, env=ENV)
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert out.count("ACCEPTED") == 2 and out.count("REJECTED") == 2, out
    assert "REJECTED (422 SCHEMA_INVALID)" in out and "REJECTED (403 SUPPLIER_NOT_AUTHORIZED)" in out
    assert "- invoice by S/MIME e-mail" in out and "ACCEPTED (250 2.0.0 Accepted as " in out
    assert "Admin console: http://localhost:" in out and "console-bootstrap-password" in out

    command = shlex.split(out[out.index("curl "):].replace("\\\n", " "))
    assert command[0] == "curl"
    for flag in ("--cacert", "--cert", "--key"):
        assert Path(command[command.index(flag) + 1]).is_file(), flag
    assert command[command.index("--data-binary") + 1].startswith("@")
    url = command[-1]
    assert url.startswith("https://127.0.0.1:") and url.endswith("/v1/invoices")
    assert (folder / "config.toml").is_file()  # --dir keeps the instance
