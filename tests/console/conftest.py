"""The console package's one running gateway (``world``), shared by every test file of tests/console
that asks for it (tests/console/test_partners.py has a world of its own).

One gateway for the package, with an admin listener on 127.0.0.1, a delivered, a dead-lettered and a
held invoice (``populate`` from tests/helpers/messages.py, ``invoice`` from tests/helpers/invoices.py),
driven by an aiohttp client exactly as a browser would (cookies, ``Origin``, the form's ``csrf``).
Tests against it are marked ``tests.helpers.console.shared`` (the package's event loop).  Each test
makes and logs in its own accounts, under names no other test uses, so that the tests do not depend
on each other's order or on which files run.
"""

from __future__ import annotations

import io
from collections.abc import AsyncIterator

import pytest
import pytest_asyncio

from gateway import logs
from gateway.operations import instance
from tests.helpers import free_port, serving
from tests.helpers.console import World, set_options
from tests.helpers.daemon import set_admin
from tests.helpers.invoices import IBAN_B, accepted, invoice
from tests.helpers.messages import populate


@pytest_asyncio.fixture(scope="package", loop_scope="package")
async def world(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[World]:
    inst = instance.init(tmp_path_factory.mktemp("console") / "gw", port=0)
    ids = await populate(inst)  # delivered, dead (an https ERP refused it), pending, foreign
    # Sessions idle for a minute end (the shortest allowed); every test logs in from 127.0.0.1.
    set_options(inst.config, console={"idle_timeout_s": 60.0, "login_burst": 1000})
    set_admin(inst, free_port())
    try:
        async with serving(inst, "warning", io.StringIO()) as running:
            async with running.session() as s:
                ids["held"] = await accepted(s, invoice("CONSOLE-0001", iban=IBAN_B), status="held")  # a new payee account
            w = World(inst, running, ids)
            await w.person("boss", "admin")  # an account exists: no bootstrap account in this gateway
            yield w
    finally:
        logs.configure("warning")
