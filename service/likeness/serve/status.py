"""The ONE mapping from Likeness domain errors to gRPC status codes.

Every servicer method is wrapped by :func:`grpc_errors` (unary and streaming):
a :class:`~likeness.errors.LikenessError` becomes the status code of its class
(or of its nearest mapped base class) with the error's own message, which says
what to fix. Anything else is a bug: logged with its traceback and returned as
``INTERNAL`` without internals leaking to the caller.
"""

from __future__ import annotations

import functools
import inspect
import logging
from typing import Any, Callable

import grpc

from likeness import errors

log = logging.getLogger(__name__)

STATUS_CODES: dict[type[errors.LikenessError], grpc.StatusCode] = {
    errors.InvalidInput: grpc.StatusCode.INVALID_ARGUMENT,
    errors.NotFound: grpc.StatusCode.NOT_FOUND,
    errors.AlreadyExists: grpc.StatusCode.ALREADY_EXISTS,
    # Weights missing on the server: the request is fine, the server is not ready for it.
    errors.ModelMissing: grpc.StatusCode.FAILED_PRECONDITION,
    errors.FailedPrecondition: grpc.StatusCode.FAILED_PRECONDITION,
    errors.Cancelled: grpc.StatusCode.CANCELLED,
    errors.Unauthenticated: grpc.StatusCode.UNAUTHENTICATED,
    errors.ResourceExhausted: grpc.StatusCode.RESOURCE_EXHAUSTED,
    errors.LikenessError: grpc.StatusCode.UNKNOWN,
}


def status_for(exc: BaseException) -> tuple[grpc.StatusCode, str]:
    """Status code and message for any exception (nearest mapped class in the MRO)."""
    if isinstance(exc, errors.LikenessError):
        for cls in type(exc).__mro__:
            if cls in STATUS_CODES:
                return STATUS_CODES[cls], str(exc) or cls.__name__
    return grpc.StatusCode.INTERNAL, f"internal error ({type(exc).__name__}); see the server log"


def _abort(context: grpc.ServicerContext, exc: BaseException) -> None:
    code, message = status_for(exc)
    if code == grpc.StatusCode.INTERNAL:
        log.exception("unexpected error in a gRPC call", exc_info=exc)
    if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
        # gRFC A6's pushback trailer: a client whose channel has a retry policy for this code waits this
        # long before its next attempt (other clients can read it); -1 means "do not retry" (too large,
        # too many: trying again cannot help).
        retry_after = getattr(exc, "retry_after_s", None)
        ms = "-1" if retry_after is None else str(max(0, round(retry_after * 1000)))
        context.set_trailing_metadata((("grpc-retry-pushback-ms", ms),))
    context.abort(code, message)


def _is_abort(exc: BaseException) -> bool:
    # grpc's context.abort() raises a bare ``Exception()`` to unwind; let it through.
    return type(exc) is Exception and not exc.args


def grpc_errors(method: Callable[..., Any]) -> Callable[..., Any]:
    """Decorate a servicer method (unary or server-streaming) with the error mapping."""
    if inspect.isgeneratorfunction(method):
        @functools.wraps(method)
        def stream(self: Any, request: Any, context: grpc.ServicerContext) -> Any:
            try:
                yield from method(self, request, context)
            except Exception as exc:  # noqa: BLE001 - mapped, or logged as INTERNAL
                if _is_abort(exc):
                    raise
                _abort(context, exc)
        return stream

    @functools.wraps(method)
    def unary(self: Any, request: Any, context: grpc.ServicerContext) -> Any:
        try:
            return method(self, request, context)
        except Exception as exc:  # noqa: BLE001 - mapped, or logged as INTERNAL
            if _is_abort(exc):
                raise
            _abort(context, exc)
    return unary
