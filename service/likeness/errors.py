"""The one error family of Likeness.

Every domain error derives from :class:`LikenessError`. The gRPC layer maps
each subclass to one status code in one place (``service/likeness/serve/status.py``);
the CLI prints ``error: <message>`` and exits with the class's exit code.
Messages say what was wrong and how to fix it.
"""

from __future__ import annotations


class LikenessError(Exception):
    """Base of every error Likeness raises on purpose."""

    exit_code = 1


class InvalidInput(LikenessError):
    """The caller gave something malformed: a spec field, a prompt, an image."""

    exit_code = 2


class NotFound(LikenessError):
    """A named character, build, file or artifact does not exist."""

    exit_code = 3


class AlreadyExists(LikenessError):
    """Creating something whose name is taken."""

    exit_code = 4


class ModelMissing(LikenessError):
    """Weights a profile needs are not on disk (we never download silently)."""

    exit_code = 5


class FailedPrecondition(LikenessError):
    """The request is valid but the system is not in a state to serve it."""

    exit_code = 6


class Cancelled(LikenessError):
    """Work was stopped on request; what was done is kept."""

    exit_code = 7


class Unauthenticated(LikenessError):
    """A call without valid credentials."""

    exit_code = 8


class ResourceExhausted(LikenessError):
    """Too large, too many, or out of memory.

    ``retry_after_s``, when set, is how long the caller should wait before trying again (the
    server sends it as gRPC's ``grpc-retry-pushback-ms`` trailer, which gRPC retry policies honour).
    """

    exit_code = 9

    def __init__(self, message: str = "", retry_after_s: float | None = None) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s
