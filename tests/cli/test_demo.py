"""gateway/cli/demo.py: ``demo --no-wait`` as a real process.

The throwaway instance accepts the valid sample over HTTPS and by S/MIME e-mail, rejects the
schema-invalid one (422) and the one from another supplier (403), names the admin console and prints a
curl command whose files exist; ``--dir`` keeps the instance.
"""

from __future__ import annotations

import shlex
import subprocess
import sys
from pathlib import Path

from tests.helpers import ENV


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

