"""Errors that reach the user as one line on stderr, each with its exit code (DESIGN 3.1)."""

from __future__ import annotations

import re
from enum import IntEnum
from itertools import pairwise

__all__ = [
    "ConfigError",
    "ExitCode",
    "Interrupted",
    "UsageError",
    "XcloudError",
    "looks_like_key_material",
    "redact_key_material",
]


class ExitCode(IntEnum):
    """What a script can branch on. 1 means only "the build failed or the start was refused":
    every other trouble has a code of its own."""

    OK = 0
    FAILED = 1  # build FAILED/ERRORED, or the API refused the start
    CANCELED = 3  # build CANCELED or SKIPPED
    GAVE_UP = 4  # gave up watching
    USAGE = 64  # a bad command line, also names and ids on it that do not exist
    UNAVAILABLE = 69  # API unavailable after retries, or no answer within the deadline
    SOFTWARE = 70  # a bug in xcloudd (sysexits EX_SOFTWARE)
    IO = 74  # the state store cannot be read or written (sysexits EX_IOERR)
    CREDENTIALS = 77  # credentials rejected
    CONFIG = 78  # config invalid, also names in it that do not exist
    INTERRUPTED = 130  # SIGINT (128 + 2)
    TERMINATED = 143  # SIGTERM (128 + 15)


class XcloudError(Exception):
    """An error meant for the user: `str(err)` is the whole, single-line message."""

    exit_code: ExitCode = ExitCode.FAILED

    def __init__(self, message: str) -> None:
        super().__init__(" ".join(message.split()))


class UsageError(XcloudError):
    exit_code = ExitCode.USAGE


class Interrupted(XcloudError):
    """A signal ended the command: 130 for SIGINT, 143 for SIGTERM, as a shell reports them."""

    def __init__(self, message: str, *, terminated: bool) -> None:
        super().__init__(message)
        self.exit_code = ExitCode.TERMINATED if terminated else ExitCode.INTERRUPTED


class ConfigError(XcloudError):
    """Config invalid: the message names the file, the key and the reason."""

    exit_code = ExitCode.CONFIG

    @classmethod
    def at(cls, file: str, key: str, reason: str) -> ConfigError:
        where = f"{file}: {key}" if key else file
        return cls(f"{where}: {reason}")


# A PEM block, also one cut short or folded onto one line (messages are single lines). The
# whole header is required: "no -----BEGIN line" in a message is no key.
_PEM_BLOCK = re.compile(r"-----BEGIN [A-Z0-9 ]*-----.*?(?:-----END [A-Z0-9 ]*-----|$)", re.DOTALL)
_BASE64_RUN = re.compile(r"(?<![A-Za-z0-9+/])[A-Za-z0-9+/]{40,}={0,2}")
# Share of neighbouring characters that switch between lower case, upper case, digit and '+'.
# Random base64 switches about 64% of the time (no 40-character window in 20,000 samples went
# below 0.3); words, paths and digit strings switch rarely (a long macOS path: about 0.2). The
# length rule alone would hide long config paths, which every config error needs to show.
_KEY_MIN_SWITCH_RATE = 0.25


def _char_class(char: str) -> int:
    if char.islower():
        return 0
    if char.isupper():
        return 1
    if char.isdigit():
        return 2
    return 3


def _random_looking(run: str) -> bool:
    # Slashes are left out: they separate path components, and random base64 has few of them.
    chars = run.replace("/", "").rstrip("=")
    if len(chars) < 2:
        return False
    switches = sum(_char_class(a) != _char_class(b) for a, b in pairwise(chars))
    return switches >= _KEY_MIN_SWITCH_RATE * (len(chars) - 1)


def looks_like_key_material(text: str) -> bool:
    """True when `text` holds a PEM block or a run of random-looking base64 (40+ characters)."""
    if _PEM_BLOCK.search(text):
        return True
    return any(_random_looking(m[0]) for m in _BASE64_RUN.finditer(text))


def redact_key_material(text: str) -> str:
    """`text` with PEM blocks and random-looking base64 runs replaced by "[redacted]".

    The last line of defence for anything shown to a user: no message is meant to quote a key,
    but a key pasted into the wrong setting can reach a message through a path nobody foresaw.
    """
    text = _PEM_BLOCK.sub("[redacted]", text)
    return _BASE64_RUN.sub(lambda m: "[redacted]" if _random_looking(m[0]) else m[0], text)
