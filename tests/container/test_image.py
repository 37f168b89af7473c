"""The container image (Containerfile, container/*.sh), built and run with podman.

The image is built as an operator would (container/build-image.sh: a debootstrap base image, wheels
made here, ``podman build``), then run with an instance made by ``init`` mounted as the documented
configuration folder and state volume.  The test waits for the image's own health check, sends the
sample invoice over mutual TLS as the demo partner, finds it delivered, and stops the container:
SIGTERM must end it with status 0, quickly.  The image and container are removed afterwards; the base
image and its root file system tarball stay cached, so a second run skips debootstrap.

Needs root, podman, runc and debootstrap (and a Debian mirror in the apt sources); without them it
skips, saying which is missing, except under CI=true, where it fails.
"""

from __future__ import annotations

import asyncio
import json
import os
import resource
import shutil
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import pytest

from gateway.cli.demo import SAMPLE
from gateway.operations import instance
from gateway.tls import client_context
from tests.helpers import ROOT, XML, post, rewrite_config

pytestmark = pytest.mark.slow

IMAGE_UID = 10001  # the Containerfile's service account
CONFIG_DIR = "/etc/einvoice-gateway"  # where the image expects its configuration folder (read-only)
STATE_DIR = "/var/lib/einvoice-gateway"  # and its state volume
HTTPS_PORT = 8443  # inside the container; init puts the admin listener on +2 and SMTP on +3
# podman runs conmon and runc with RLIMIT_NPROC 32768 (measured: podman 4.3 on Debian 12), and runc
# cannot give the container more than it has itself.
NPROC_MAX = 32768
BUILD_TIMEOUT_S = 900.0  # a cold build: debootstrap, every wheel, pip install in the image
READY_TIMEOUT_S = 180.0  # the image's start period (150 s) and a margin
DELIVERY_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 60.0  # what the image asks `podman stop` to allow (in-flight work gets 30-45 s)
CLEAN_STOP_S = 20.0  # an idle gateway stops well within this


def prerequisite(ok: bool, reason: str) -> None:
    """Skip without ``ok``, saying why; under CI=true a missing prerequisite is a failure."""
    if ok:
        return
    if os.environ.get("CI") == "true":
        pytest.fail(f"{reason} (required under CI=true)")
    pytest.skip(reason)


def podman(*argv: str, timeout: float = 60.0, check: bool = True) -> subprocess.CompletedProcess[str]:
    """podman with the runc runtime (crun fails on these machines' cgroup layout)."""
    result = subprocess.run(["podman", "--runtime", "runc", *argv], capture_output=True, text=True, timeout=timeout)
    if check and result.returncode != 0:
        raise AssertionError(f"podman {' '.join(argv)} exited {result.returncode}: {result.stderr.strip()}")
    return result


def ulimits() -> list[str]:
    """The container's limits, at or below this host's hard limits (podman's defaults are above them)."""
    nofile = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    nproc = resource.getrlimit(resource.RLIMIT_NPROC)[1]
    nofile = 65536 if nofile == resource.RLIM_INFINITY else min(nofile, 65536)
    nproc = NPROC_MAX if nproc == resource.RLIM_INFINITY else min(nproc, NPROC_MAX)
    return ["--ulimit", f"nofile={nofile}:{nofile}", "--ulimit", f"nproc={nproc}:{nproc}"]


@pytest.fixture(scope="module")
def image() -> Iterator[str]:
    """The gateway's image, built from this checkout by container/build-image.sh; removed afterwards."""
    missing = [tool for tool in ("podman", "runc", "debootstrap") if shutil.which(tool) is None]
    prerequisite(not missing, f"{', '.join(missing)} not installed (apt-get install -y podman runc debootstrap)")
    prerequisite(os.geteuid() == 0, "building the base image needs root (debootstrap), and the test chowns to the image's uid")
    prerequisite(sys.version_info[:2] == (3, 11), "the wheels are made with this Python, and the image runs Debian 12's 3.11")
    tag = f"localhost/einvoice-gateway-test:{uuid.uuid4().hex[:12]}"
    env = {**os.environ, "PYTHON": sys.executable}
    built = subprocess.run([str(ROOT / "container" / "build-image.sh"), tag], capture_output=True, text=True, env=env,
                           timeout=BUILD_TIMEOUT_S)
    assert built.returncode == 0, f"container/build-image.sh exited {built.returncode}:\n{built.stderr[-4000:]}"
    assert built.stdout.strip().splitlines()[-1] == tag
    try:
        probe = podman("run", "--rm", *ulimits(), "--entrypoint", "/bin/true", tag, check=False)
        prerequisite(probe.returncode == 0, f"podman cannot run a container here: {probe.stderr.strip()}")
        yield tag
    finally:
        podman("rmi", "--force", tag, check=False)


def mounted_instance(tmp_path: Path) -> tuple[instance.Instance, Path]:
    """An instance laid out as the image expects: its folder becomes /etc/einvoice-gateway (owned by
    the image's uid: key files must belong to the gateway's user), state in a separate folder."""
    inst = instance.init(tmp_path / "etc", host="0.0.0.0", port=HTTPS_PORT)  # noqa: S104 (listens inside the container)

    def container_paths(data: dict) -> None:
        data["instance"]["state_dir"] = f"{STATE_DIR}/state"
        data["destinations"][0]["path"] = f"{STATE_DIR}/outbox"
        data["https"]["workers"] = 2  # the supervisor and its workers under tini, whatever the CPU count

    rewrite_config(inst.config, container_paths)
    state = tmp_path / "var"
    for folder in (state, state / "state", state / "outbox"):
        folder.mkdir(mode=0o700)
    for top in (inst.root, state):
        for folder, _dirs, names in os.walk(top):
            for name in [".", *names]:
                os.chown(Path(folder) / name, IMAGE_UID, IMAGE_UID)
    return inst, state


def free_loopback_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def healthy(name: str) -> tuple[bool, str]:
    """The image's HEALTHCHECK, run now (podman schedules it with systemd timers, absent here)."""
    result = podman("healthcheck", "run", name, check=False, timeout=30)
    return result.returncode == 0, (result.stdout + result.stderr).strip()


def state_of(name: str) -> dict:
    return json.loads(podman("inspect", "--format", "{{json .State}}", name).stdout)


def wait_until_healthy(name: str) -> None:
    deadline = time.monotonic() + READY_TIMEOUT_S
    while True:
        ok, said = healthy(name)
        if ok:
            return
        if not state_of(name)["Running"]:
            logs = podman("logs", name, check=False).stdout + podman("logs", name, check=False).stderr
            raise AssertionError(f"the container stopped before it was ready: {said}\n{logs[-4000:]}")
        if time.monotonic() > deadline:
            raise AssertionError(f"not healthy after {READY_TIMEOUT_S} s: {said}")
        time.sleep(1.0)


async def send_sample(inst: instance.Instance, port: int) -> tuple[int, dict]:
    ctx = client_context(inst.ca.cert, inst.demo_client.cert, inst.demo_client.key)
    async with aiohttp.ClientSession(f"https://127.0.0.1:{port}", connector=aiohttp.TCPConnector(ssl=ctx),
                                     timeout=aiohttp.ClientTimeout(total=60)) as s:
        answer = await post(s, SAMPLE, XML)
    await asyncio.sleep(0.05)  # let the TLS transport finish closing
    return answer.status, answer.json


def wait_for_file(path: Path) -> bytes:
    deadline = time.monotonic() + DELIVERY_TIMEOUT_S
    while not path.is_file():
        assert time.monotonic() < deadline, f"{path.name} was not delivered within {DELIVERY_TIMEOUT_S} s"
        time.sleep(0.2)
    return path.read_bytes()


def test_the_image_serves_an_invoice_over_mutual_tls_and_stops_cleanly(image: str, tmp_path: Path) -> None:
    inst, state = mounted_instance(tmp_path)
    port = free_loopback_port()
    name = f"einvoice-gateway-test-{uuid.uuid4().hex[:12]}"
    podman("run", "--detach", "--name", name, *ulimits(), "--stop-timeout", str(int(STOP_TIMEOUT_S)),
           "--publish", f"127.0.0.1:{port}:{HTTPS_PORT}",
           "--volume", f"{inst.root}:{CONFIG_DIR}:ro", "--volume", f"{state}:{STATE_DIR}", image)
    try:
        wait_until_healthy(name)
        uid = podman("exec", name, "python3", "-c", "import os; print(os.getuid(), os.getgid())").stdout.split()
        assert uid == [str(IMAGE_UID)] * 2, "the daemon must not run as root"

        status, reply = asyncio.run(send_sample(inst, port))
        assert status == 202, reply
        delivered = wait_for_file(state / "outbox" / f"{reply['message_id']}.xml")
        assert delivered == SAMPLE

        started = time.monotonic()
        podman("stop", "--time", str(int(STOP_TIMEOUT_S)), name, timeout=STOP_TIMEOUT_S + 30)
        took = time.monotonic() - started
        final = state_of(name)
        assert final["ExitCode"] == 0, final
        assert took < CLEAN_STOP_S, f"SIGTERM took {took:.1f} s to stop an idle gateway"
        events = [json.loads(line) for line in podman("logs", name).stdout.splitlines() if line.startswith("{")]
        accepted = [e for e in events if e.get("event") == "invoice.accepted"]
        assert [e["message_id"] for e in accepted] == [reply["message_id"]]
        assert events[-1]["event"] == "supervisor.stopped", events[-3:]
    finally:
        podman("rm", "--force", "--time", "0", name, check=False)


def test_a_key_file_others_can_read_stops_the_container_naming_the_fix(image: str, tmp_path: Path) -> None:
    """The image keeps the gateway's refusal of readable key files: the mount must carry mode 0600."""
    inst, state = mounted_instance(tmp_path)
    inst.server.key.chmod(0o644)
    ran = podman("run", "--rm", *ulimits(), "--volume", f"{inst.root}:{CONFIG_DIR}:ro",
                 "--volume", f"{state}:{STATE_DIR}", image, check=False, timeout=120)
    assert ran.returncode == 2, ran
    assert "is accessible by group or others" in ran.stderr and "chmod 600" in ran.stderr, ran.stderr
