"""gateway/cli/serve.py: ``serve`` as a real process (``python -m gateway serve``).

It serves the partner API until SIGTERM, logs JSON lines on stdout (one ``invoice.accepted`` per
invoice, ``gateway.started`` and ``gateway.stopped`` per serving process, the supervisor's own when
there are workers) and exits 0.  ``init`` is tested in tests/operations/test_instance.py, ``check-config``
with the configuration it checks (tests/config/test_load.py).
"""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import sys

from gateway.cli.demo import SAMPLE
from gateway.operations import instance
from tests.helpers import ENV, free_port, wait_for_port
from tests.helpers.daemon import post_many


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

