"""The DATA transfer reader of the SMTP listener (gateway/inbound/smtp.read_data), fed through a
StreamReader exactly as aiosmtpd sets it up (its line-length limit as the buffer limit), in every
chunking: byte by byte, in odd sizes, all at once.  The end-to-end cases (over STARTTLS, through
aiosmtpd) are in test_smtp.py."""

from __future__ import annotations

import asyncio
import random

import pytest

from gateway.inbound.smtp import MAX_LINE_BYTES, DataRefused, read_data

READER_LIMIT = 1001  # aiosmtpd's SMTP.line_length_limit, which it gives its StreamReader as the limit
CHUNKINGS = (1, 2, 3, 5, 7, 64, 1000, 1001, 1002, 4096, 1 << 20)


def stuffed(lines: list[bytes]) -> bytes:
    """What a client sends after DATA for these lines (RFC 5321 4.5.2): a dot doubled at a line start, then the end."""
    return b"".join((b"." + line if line.startswith(b".") else line) + b"\r\n" for line in lines) + b".\r\n"


async def read(wire: bytes, chunk: int, max_bytes: int = 1 << 20) -> tuple[bytes | str, bytes]:
    """read_data over ``wire`` fed ``chunk`` bytes at a time: (the message or the refusal, what is left unread)."""
    reader = asyncio.StreamReader(limit=READER_LIMIT)

    async def feed() -> None:
        for i in range(0, len(wire), chunk):
            reader.feed_data(wire[i:i + chunk])
            await asyncio.sleep(0)
        reader.feed_eof()

    feeder = asyncio.create_task(feed())
    try:
        result: bytes | str = await read_data(reader, max_bytes)
    except DataRefused as exc:
        result = exc.reply
    await feeder
    return result, await reader.read()


@pytest.mark.parametrize("chunk", CHUNKINGS)
async def test_dot_stuffed_lines_come_back_as_sent_and_what_follows_the_end_stays_unread(chunk: int) -> None:
    lines = [b"From: a@example.org", b"", b".", b"..", b".starts with a dot", b"ends with a dot.", b"a.", b".",
             b"x" * (MAX_LINE_BYTES - 2), b"", b"last."]
    result, rest = await read(stuffed(lines) + b"RSET\r\nQUIT\r\n", chunk)
    assert result == b"".join(line + b"\r\n" for line in lines)
    assert rest == b"RSET\r\nQUIT\r\n"  # a pipelined command is the next command, not part of the message


@pytest.mark.parametrize("chunk", (1, 2, 4096))
async def test_an_empty_message_and_a_message_of_dots(chunk: int) -> None:
    assert await read(b".\r\n", chunk) == (b"", b"")
    assert await read(b"..\r\n.\r\nNOOP\r\n", chunk) == (b".\r\n", b"NOOP\r\n")
    assert await read(b"...\r\n.\r\n", chunk) == (b"..\r\n", b"")


@pytest.mark.parametrize("chunk", (1, 7, 4096, 1 << 20))
async def test_a_dot_inside_a_line_or_a_line_end_split_from_its_dot_does_not_end_the_data(chunk: int) -> None:
    # ".\r\n" that does not start a line, and a line ".\rx" (its dot is removed like any line's first dot)
    wire = b"a.\r\nb\r\n.\rx\r\nc\r\n..\r\n\r\n.\r\n"
    assert await read(wire, chunk) == (b"a.\r\nb\r\n\rx\r\nc\r\n.\r\n\r\n", b"")


@pytest.mark.parametrize("chunk", (3, 4096))
async def test_random_messages_round_trip(chunk: int) -> None:
    rng = random.Random(1)
    alphabet = [b".", b"\r", b"\n", b"a", b" "]

    def line() -> bytes:  # no CRLF inside, and no CR at the end (it would make a CRLF with the line end)
        text = b"".join(rng.choice(alphabet) for _ in range(rng.randrange(0, 12)))
        while b"\r\n" in text:
            text = text.replace(b"\r\n", b"\n")
        return text.rstrip(b"\r")

    for _ in range(200):
        lines = [line() for _ in range(rng.randrange(0, 30))]
        result, rest = await read(stuffed(lines) + b"NOOP\r\n", chunk)
        assert result == b"".join(line + b"\r\n" for line in lines), lines
        assert rest == b"NOOP\r\n"


@pytest.mark.parametrize("chunk", (1, 1000, 4096, 1 << 20))
async def test_a_message_over_the_size_is_read_to_its_end_then_refused(chunk: int) -> None:
    lines = [b"y" * 76] * 100  # 7,800 bytes on the wire
    result, rest = await read(stuffed(lines) + b"RSET\r\n", chunk, max_bytes=5_000)
    assert isinstance(result, str) and result.startswith("552 5.3.4")
    assert rest == b"RSET\r\n"  # the session goes on in step
    assert (await read(stuffed(lines), chunk, max_bytes=7_800))[0] == b"".join(line + b"\r\n" for line in lines)


@pytest.mark.parametrize("chunk", (1, 4096, 1 << 20))
async def test_a_line_over_1000_bytes_is_refused_after_the_transfer(chunk: int) -> None:
    too_long = [b"ok", b"z" * (MAX_LINE_BYTES - 1), b"ok"]  # 999 + CRLF = 1001 bytes
    result, rest = await read(stuffed(too_long) + b"RSET\r\n", chunk)
    assert isinstance(result, str) and result.startswith("500 5.5.2 Line too long")
    assert rest == b"RSET\r\n"
    very_long = [b"w" * 100_000]  # far over the reader's own buffer limit
    result, rest = await read(stuffed(very_long), chunk)
    assert isinstance(result, str) and result.startswith("500 ")
    dotted = [b"." + b"d" * (MAX_LINE_BYTES - 3)]  # 998 + CRLF, sent as 999 + CRLF: the added dot is not counted
    assert (await read(stuffed(dotted), chunk))[0] == dotted[0] + b"\r\n"


def test_the_longest_line_is_found_in_any_window() -> None:
    from gateway.inbound.smtp import _longest_line

    rng = random.Random(2)
    for _ in range(300):
        lines = [b"a" * rng.choice((0, 1, 5, 70, 998, 999, 5000)) for _ in range(rng.randrange(0, 40))]
        content = b"\r\n".join(lines) + rng.choice((b"", b"\r\n"))
        window = rng.choice((16, 1000, 1024, 64 * 1024))
        expected = max(map(len, content.split(b"\r\n")))
        found = _longest_line(content, window)
        assert found == expected if expected < window - 1 else found >= window - 1, (expected, found, window)


async def test_a_connection_that_ends_mid_transfer_raises_incomplete_read() -> None:
    reader = asyncio.StreamReader(limit=READER_LIMIT)
    reader.feed_data(b"line\r\nno end")
    reader.feed_eof()
    with pytest.raises(asyncio.IncompleteReadError):
        await read_data(reader, 1 << 20)


@pytest.mark.parametrize("arg", [
    "<billing@supplier.example>", "<billing@supplier.example> SIZE=4096", " <a.b+c@x-y.example>  BODY=8BITMIME",
    "<o'brien!#$%&*/=?^_`{|}~-@example.org>", "<UPPER@Example.ORG>",
    # not the plain form: aiosmtpd's own parser decides
    '<"quoted local"@example.org>', "<a..b@example.org>", "<.a@example.org>", "<a.@example.org>",
    "<@relay.example:a@example.org>", "<a@[192.0.2.1]>", "<a@example.org", "a@example.org", "<>", "",
    "<a@example..org>", "<a@-example.org>",
    "<a@example.org> (comment) SIZE=1", "<a@example.org>\tSIZE=1", "<a b@example.org>", "<a@example.org>x",
])
def test_the_address_fast_path_agrees_with_aiosmtpd(arg: str) -> None:
    from aiosmtpd.smtp import SMTP

    from gateway.inbound.smtp import _Session

    class Handler:
        pass

    async def both() -> tuple[object, object]:
        ours = _Session.__new__(_Session)
        ours.local_part_limit = 0
        theirs = SMTP(Handler())
        return ours._getaddr(arg), theirs._getaddr(arg)

    ours, theirs = asyncio.run(both())
    assert ours == theirs
