"""Fixtures of the S/MIME tests.

* ``shared_inst``: a fresh instance, made once per module and not changed by the tests: its
  development CA, the gateway's S/MIME certificate and key (RSA, ``invoices@gateway.localhost``) and
  the demo partner's (RSA, registered for ``demo-supplier``).
"""

from __future__ import annotations

import pytest

from gateway.operations import instance


@pytest.fixture(scope="module")
def shared_inst(tmp_path_factory: pytest.TempPathFactory) -> instance.Instance:
    return instance.init(tmp_path_factory.mktemp("smime") / "gw", port=0)
