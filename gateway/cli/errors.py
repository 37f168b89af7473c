"""What a command says when it does not do what was asked, and its exit code.

Every such message is one line on stderr, ``einvoice-gateway: KIND: …``; stdout carries results only.
The kinds, by what the operator does next::

    exit 0  done; an empty listing too (it says so on stderr, or prints [] with --json)
    exit 1  the command ran and reports a problem; looking at it, or running again later, may change that:
            a check that found one        verify INVALID, audit verify / backup verify FAILED, partners check,
                                          keys rewrap with objects that do not open (said on stdout, as results)
            failed: …                     a file or the store could not be read or written
    exit 2  what was asked cannot be done as asked; the same command fails the same way:
            usage: … error: …             argparse: an unknown command or option, a missing argument, a value
                                          not among the allowed ones (it lists them)
            usage error: …                an option's value the parser cannot check alone (a file to read)
            configuration error: KEY: …   the configuration, or a file it names, is wrong; the key path is named
            not found: …                  the message, partner, user, key or destination named does not exist
            refused: …                    the gateway refuses it as things are (already decided, already
                                          signed, registered for another partner); nothing was changed

``said`` turns every error a command may raise into its line and code, so that no traceback reaches
the operator for anything the gateway raises on purpose or for a file that cannot be read.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator

from ..errors import ConfigError, GatewayError, Transient, VaultError
from .output import printable

PROG = "einvoice-gateway"


class CommandError(Exception):
    """A command's own refusal: said as ``kind``, exit ``exit_code``."""

    kind = "error"
    exit_code = 2

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class UsageError(CommandError):
    kind = "usage error"


class NotFound(CommandError):
    kind = "not found"


class Refused(CommandError):
    kind = "refused"


class Failed(CommandError):
    kind = "failed"
    exit_code = 1


@contextlib.contextmanager
def said_as(kind: type[CommandError]) -> Iterator[None]:
    """Inside, a ConfigError is about what the command asked for, not about the configuration (a lower
    layer checks option values and changes with the same error): it is said as ``kind``."""
    try:
        yield
    except ConfigError as exc:
        raise kind(exc.message) from None


def classify(exc: CommandError | GatewayError | OSError) -> tuple[str, int, str]:
    """(kind, exit code, message) of an error that ends a command."""
    if isinstance(exc, CommandError):
        return exc.kind, exc.exit_code, exc.message
    if isinstance(exc, ConfigError):
        return "configuration error", 2, exc.message
    if isinstance(exc, Transient | VaultError):
        return Failed.kind, Failed.exit_code, exc.message
    if isinstance(exc, GatewayError):  # Rejected, NotHeld, AccountError: the gateway will not do it as things are
        return Refused.kind, Refused.exit_code, exc.message
    where = f"{exc.filename}: " if exc.filename is not None else ""
    return Failed.kind, Failed.exit_code, f"{where}{exc.strerror or exc}"


def said(exc: CommandError | GatewayError | OSError) -> int:
    """Say ``exc`` on one line of stderr; its exit code."""
    kind, code, message = classify(exc)
    print(f"{PROG}: {kind}: {printable(message)}", file=sys.stderr)
    return code
