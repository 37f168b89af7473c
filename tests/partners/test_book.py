"""gateway/partners/book.py: the partners file read into a directory and written back.

* ``parse_instant``: the dates of acceptance windows, refused naming the key when malformed;
* the inline tables ``{file, from, until}`` of ``client_certs``, ``signing_certs`` and ``smime_certs``:
  loaded into the partner's windows (refused naming the key when wrong), written back by ``editing()``
  as they were read (``_as_toml``), a pending partner's empty verification included;
* windows of signing certificates loaded from the file decide ``signers_for`` at a moment;
* party identifiers are kept as typed (invisible characters removed) and compared by their keys: two
  partners naming one identifier in two forms stop the load.

Certificates are made at test time with gateway.devpki.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from gateway import devpki
from gateway.errors import ConfigError
from gateway.identifiers import parse_party_id
from gateway.model import CertWindow, PartnerStatus
from gateway.partners.book import _as_toml, editing, instant_text, load_directory, parse_instant
from tests.helpers.partners import DAY, FUTURE, PAST, acme, info, peer, rollover_pki, write_partners

JAN31 = datetime(2027, 1, 31, tzinfo=UTC)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, devpki.Issued]:
    """A development CA and a few leaf certificates, in the folder the partners files of this module live in."""
    return rollover_pki(tmp_path_factory.mktemp("rollover-pki"))


# --- 1. parse_instant and the inline tables --------------------------------------------------------


@pytest.mark.parametrize(("text", "expected"), [
    ("2027-01-31", JAN31),
    ("2027-01-31T12:00:00Z", JAN31 + timedelta(hours=12)),
    ("2027-01-31T12:30Z", JAN31 + timedelta(hours=12, minutes=30)),
])
def test_parse_instant_accepts_a_date_and_a_utc_time(text, expected):
    got = parse_instant(text, "start")
    assert got == expected and got.tzinfo is not None and got.utcoffset() == timedelta(0)
    assert instant_text(got) == expected.strftime("%Y-%m-%dT%H:%M:%SZ")


@pytest.mark.parametrize("text", ["", "junk", "31.01.2027", "2027-1-31", "2027-02-30", "2027-01-31T12:00:00",
                                  "2027-01-31T12:00:00+02:00", "2027-01-31 12:00:00Z", "2027-01-31T25:00:00Z",
                                  " 2027-01-31", "2027-01-31\n"])
def test_parse_instant_refuses_junk_naming_the_key(text):
    with pytest.raises(ConfigError) as caught:
        parse_instant(text, "partners[0].client_certs[1].from")
    assert caught.value.message.startswith(f"partners[0].client_certs[1].from: {text!r} is not a date")
    assert "2027-01-31T12:00:00Z" in caught.value.message  # says how to write it


@pytest.mark.parametrize(("entry", "named"), [
    ('{file = "new.crt", from = "soon"}', "partners[0].client_certs[1].from: 'soon' is not a date"),
    ('{file = "new.crt", until = "2027-13-01"}', "partners[0].client_certs[1].until: '2027-13-01' is not a date"),
    ('{file = "new.crt", from = "2027-02-01", until = "2027-01-01"}',
     "partners[0].client_certs[1].until: must be later than partners[0].client_certs[1].from"),
    ('{file = "new.crt", from = "2027-02-01", until = "2027-02-01T00:00:00Z"}',  # the same moment: an empty window
     "partners[0].client_certs[1].until: must be later than partners[0].client_certs[1].from"),
    ('{file = "new.crt", from = "2027-02-01", unitl = "2027-03-01"}', "partners[0].client_certs[1].unitl: unknown key"),
    ('{file = "new.crt", start = "2027-02-01"}', "partners[0].client_certs[1].start: unknown key"),
    ('{from = "2027-02-01"}', "partners[0].client_certs[1].file: missing (required)"),
    ('{file = "gone.crt", from = "2027-02-01"}', "partners[0].client_certs[1].file: file not found"),
    ('{file = "new.crt", from = 2027-02-01}', "partners[0].client_certs[1].from: expected a string"),
])
def test_bad_window_is_refused_naming_the_key(pki, entry, named):
    path = write_partners(pki["ca"].cert.parent, acme(f'"old.crt", {entry}'))
    with pytest.raises(ConfigError) as caught:
        load_directory(path)
    assert caught.value.message.startswith(named), caught.value.message


# --- 2. loading and writing back -------------------------------------------------------------------


def test_windows_load_and_round_trip(pki):
    folder = pki["ca"].cert.parent
    path = write_partners(folder, acme(
        '"old.crt", {file = "new.crt", from = "2027-01-31T12:00:00Z"}',
        extra='signing_certs = [{file = "sig-old.crt", until = "2027-06-01"}, "sig-new.crt"]\n'
              'emails = ["billing@acme.example"]\n'
              'smime_certs = [{file = "smime.crt", from = "2027-01-01", until = "2028-01-01T08:00:00Z"}]\n'))
    [p] = load_directory(path).partners
    abs_ = {name: str(folder / f"{name}.crt") for name in ("old", "new", "sig-old", "sig-new", "smime")}
    expected = (
        CertWindow("client", abs_["new"], info(pki["new"]).spki_sha256, JAN31 + timedelta(hours=12), None),
        CertWindow("signing", abs_["sig-old"], info(pki["sig-old"]).spki_sha256, None, datetime(2027, 6, 1, tzinfo=UTC)),
        CertWindow("smime", abs_["smime"], info(pki["smime"]).spki_sha256, datetime(2027, 1, 1, tzinfo=UTC),
                   datetime(2028, 1, 1, 8, tzinfo=UTC)),
    )
    assert p.windows == expected
    assert p.client_certs == (abs_["old"], abs_["new"]) and p.signing_certs == (abs_["sig-old"], abs_["sig-new"])

    shown = _as_toml(p, folder)
    assert shown["client_certs"] == ["old.crt", {"file": "new.crt", "from": "2027-01-31T12:00:00Z"}]
    assert shown["signing_certs"] == [{"file": "sig-old.crt", "until": "2027-06-01T00:00:00Z"}, "sig-new.crt"]
    assert shown["smime_certs"] == [{"file": "smime.crt", "from": "2027-01-01T00:00:00Z", "until": "2028-01-01T08:00:00Z"}]

    with editing(path):
        pass  # no change: written back as it was read
    [again] = load_directory(path).partners
    assert again == p
    assert 'from = "2027-01-31T12:00:00Z"' in path.read_text()


def test_pending_partner_round_trips(pki):
    path = write_partners(pki["ca"].cert.parent, acme('"old.crt"', status="pending").replace('"pytest"', '""')
                          .replace('"2026-01-01T00:00:00Z"', '""'))
    with editing(path):
        pass
    [p] = load_directory(path).partners
    assert (p.status, p.verified_by, p.verified_at) == (PartnerStatus.PENDING, "", "")


# --- 3. signers_for: the signing windows of the file --------------------------------------------------


def test_signers_for_leaves_out_retired_and_future_signing_certificates(pki, tmp_path):
    for name in ("old", "sig-old", "sig-new", "sig-next"):
        (tmp_path / f"{name}.crt").write_bytes(pki[name].cert.read_bytes())
    path = write_partners(tmp_path, acme('"old.crt"', extra=(
        f'signing_certs = [{{file = "sig-old.crt", until = "{instant_text(PAST)}"}}, "sig-new.crt", '
        f'{{file = "sig-next.crt", from = "{instant_text(FUTURE)}"}}]\n')))
    directory = load_directory(path)
    keys = {n: info(pki[n]).spki_sha256 for n in ("sig-old", "sig-new", "sig-next")}

    def signers(at: datetime | None = None) -> set[str]:
        return {s.spki for s in directory.signers_for("acme", at)}

    assert signers() == {keys["sig-new"]}
    assert signers(PAST - DAY) == {keys["sig-old"], keys["sig-new"]}
    assert signers(FUTURE) == {keys["sig-new"], keys["sig-next"]}
    assert directory.signers_for("nobody") == []
    # the client certificate (no window) is not affected by its partner's signing windows
    assert directory.gate(peer(pki["old"])).name == "acme"


# --- 4. party identifiers: kept as written, compared by their keys -----------------------------------


@pytest.mark.parametrize("again", ["0088:579 0000 435975", "GLN:5790000435975", "０088:5790000435975",
                                   "0088:579\u200b0000435975", "5790000435975"])
def test_two_partners_with_one_identifier_in_two_forms_are_refused(pki, again):
    """Issue 20, item 3: the file the daemon reads (and every edit, which is checked by loading it)."""
    beta = acme('"new.crt"').replace('"acme"', '"beta"').replace('"0088:5790000435975"', f'"{again}"')
    path = write_partners(pki["ca"].cert.parent, acme('"old.crt"') + "\n" + beta)
    with pytest.raises(ConfigError) as caught:
        load_directory(path)
    shown = parse_party_id(again, "x")  # as typed, without what cannot be seen
    also = " (as '0088:5790000435975')" if shown != "0088:5790000435975" else ""
    assert caught.value.message == f"partners[1].party_ids: {shown!r} is already registered for partner 'acme'{also}"


def test_identifiers_are_written_back_as_typed_without_invisibles(pki):
    path = write_partners(pki["ca"].cert.parent, acme('"old.crt"').replace(
        '"0088:5790000435975"', '"0088:579\u00a00000\u00a0435975", "BE\u200b 0123.456.789", "ＤＥ123456789"'))
    [p] = load_directory(path).partners
    assert p.party_ids == {"0088:579 0000 435975", "BE 0123.456.789", "DE123456789"}
    with editing(path):
        pass
    assert load_directory(path).partners[0].party_ids == p.party_ids
