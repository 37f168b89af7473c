"""gateway/cli/demo.py: ``demo`` as a real process.

The throwaway instance accepts the valid sample over HTTPS and by S/MIME e-mail, rejects the
schema-invalid one (422) and the one from another supplier (403), names the admin console and prints a
curl command whose files exist; ``--dir`` keeps the instance.  Serving, it stops on Ctrl-C (SIGINT),
SIGTERM or SIGHUP (the terminal was closed) and removes its instance with the keys in it, exit 0; so it
does when the signal comes while the samples are still being sent.
"""

from __future__ import annotations

import os
import selectors
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.helpers import ENV

WAIT_S = 60.0


@pytest.mark.slow
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



class Output:
    """The demo's stdout as it comes (the child runs unbuffered), read line by line with a deadline."""

    def __init__(self, proc: subprocess.Popen[bytes]) -> None:
        assert proc.stdout is not None
        self.fd = proc.stdout.fileno()
        self.lines: list[str] = []
        self.pending = b""

    def until(self, starting: str) -> str:
        """Read until a line starts with ``starting``; that line."""
        deadline = time.monotonic() + WAIT_S
        with selectors.DefaultSelector() as sel:
            sel.register(self.fd, selectors.EVENT_READ)
            while True:
                *complete, self.pending = self.pending.split(b"\n")
                for raw in complete:
                    self.lines.append(raw.decode())
                    if self.lines[-1].startswith(starting):
                        return self.lines[-1]
                left = deadline - time.monotonic()
                assert left > 0, f"no {starting!r} within {WAIT_S} s: {self.text}"
                if sel.select(timeout=left):
                    data = os.read(self.fd, 65536)
                    assert data, f"the demo ended before printing {starting!r}: {self.text}"
                    self.pending += data

    @property
    def text(self) -> str:
        return "\n".join(self.lines) + self.pending.decode(errors="replace")


@pytest.mark.slow
@pytest.mark.parametrize(("sig", "when"), [(signal.SIGHUP, "Serving until Ctrl-C."), (signal.SIGTERM, "Serving until Ctrl-C."),
                                           (signal.SIGINT, "Serving until Ctrl-C."), (signal.SIGHUP, "Gateway listening")],
                         ids=["SIGHUP while serving", "SIGTERM while serving", "SIGINT while serving",
                              "SIGHUP while sending the samples"])
def test_a_signal_stops_the_demo_and_removes_its_instance_and_keys(tmp_path: Path, sig: signal.Signals, when: str) -> None:
    proc = subprocess.Popen([sys.executable, "-m", "gateway", "demo", "--port", "0"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env=ENV | {"TMPDIR": str(tmp_path), "PYTHONUNBUFFERED": "1"})
    output = Output(proc)
    try:
        first = output.until("Demo instance (development PKI, throwaway): ")
        root = Path(first.split(": ", 1)[1].strip())
        assert root.parent == tmp_path and root.name.startswith("einvoice-gateway-demo-")
        output.until(when)
        assert (root / "keys" / "master-1.key").is_file() and (root / "pki" / "ca.key").is_file()
        proc.send_signal(sig)
        rest, err = proc.communicate(timeout=WAIT_S)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    out = output.text + rest.decode()
    assert proc.returncode == 0, out + err.decode()
    assert b"Traceback" not in err, err.decode()
    assert not root.exists()  # the keys went with it
    assert list(tmp_path.iterdir()) == []
    assert out.rstrip().endswith(f"Stopped; removed {root}."), out
