"""Errors that reach the user as one line on stderr, each with its exit code (DESIGN 3.1)."""

from __future__ import annotations

from enum import IntEnum


class ExitCode(IntEnum):
    OK = 0
    FAILED = 1  # build FAILED/ERRORED, or the API refused the start
    CANCELED = 3  # build CANCELED or SKIPPED
    GAVE_UP = 4  # gave up watching
    USAGE = 64
    UNAVAILABLE = 69  # API unavailable after retries
    CREDENTIALS = 77  # credentials rejected
    CONFIG = 78  # config invalid


class XcloudError(Exception):
    """An error meant for the user: `str(err)` is the whole, single-line message."""

    exit_code: ExitCode = ExitCode.FAILED

    def __init__(self, message: str) -> None:
        super().__init__(" ".join(message.split()))


class UsageError(XcloudError):
    exit_code = ExitCode.USAGE


class ConfigError(XcloudError):
    """Config invalid: the message names the file, the key and the reason."""

    exit_code = ExitCode.CONFIG

    @classmethod
    def at(cls, file: str, key: str, reason: str) -> ConfigError:
        where = f"{file}: {key}" if key else file
        return cls(f"{where}: {reason}")
