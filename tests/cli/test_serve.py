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

import pytest

from gateway.cli.demo import SAMPLE
from gateway.operations import instance
from tests.helpers import ENV, free_port, os_group, run_command, wait_for_port
from tests.helpers.daemon import post_many


@pytest.mark.slow
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



def test_check_config_warns_when_the_erp_group_cannot_read_the_inbox(inst, capsys):
    """A warning, not a failure: the group does not exist, then a folder on the way keeps it out."""
    text = inst.config.read_text()
    inst.config.write_text(text.replace('mode = "0640"', 'group = "no-such-group-7f3a"\nmode = "0640"'))
    code, out, err = run_command(capsys, "check-config", "-c", str(inst.config))
    assert code == 0 and out.startswith(f"{inst.config}: OK"), err
    assert "warning: destinations[0].group: the group 'no-such-group-7f3a' does not exist, so the ERP cannot read " \
           f"{inst.delivery_folder}: create it (groupadd no-such-group-7f3a)" in err
    with os_group("gwchk") as (name, _):
        inst.config.write_text(text.replace('mode = "0640"', f'group = "{name}"\nmode = "0640"'))
        code, out, err = run_command(capsys, "check-config", "-c", str(inst.config))
        assert code == 0, err
        # init's folder is 0700: the instance folder keeps the group out, and the inbox is not the group's yet.
        assert f"warning: destinations[0].path: {inst.root} (mode 0700, group root) does not let the group " \
               f"'{name}' search it" in err
        assert f"warning: destinations[0].path: {inst.delivery_folder} (mode 0700, group root) does not let the group " \
               f"'{name}' read it and remove what it took yet" in err
        assert inst.delivery_folder.stat().st_gid == 0  # check-config changed nothing
