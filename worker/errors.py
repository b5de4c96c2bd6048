"""The exception tree of `worker`. Library exceptions are translated at the boundary into these.

::

    WorkerError
    ├── UsageError                 bad command line, credentials file or run directory (exit 2)
    │   ├── JobFileError           a job or targets file is invalid; names file, line, field, fix
    │   └── InvalidTargetError     a target with neither selector, or half a product/device pair
    ├── StoreError                 a run directory's file cannot be written (disk full, permission)
    └── EnOSError                  something the gateway (or the way to it) answered
        ├── RetryableError         worth another attempt: 5xx, timeout, dropped, malformed body
        │   ├── RateLimitedError   HTTP 429: flow control, carries Retry-After
        │   │   └── QuotaPausedError   a 429 while the run waits for the gateway's quota
        │   └── OversizedAnswerError  an answer past the cap (a search asks for smaller pages)
        ├── TargetError            final for this one target: 99400, 99404, other codes
        │   └── UnreadableAnswerError  the client failed on an answer: final, effect unknown
        └── FatalError             stops the whole run (exit 3): nothing else will succeed
            ├── AuthError          credentials or token rejected, after one renewal
            └── PermissionDeniedError  99403 or HTTP 403

Only :class:`FatalError` stops a run; every other :class:`EnOSError` becomes one target's result.
Messages never contain a secret, an access token or a signature.
"""

from __future__ import annotations

import reprlib
from enum import IntEnum
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from worker.budget import Budget

_SHOWN = reprlib.Repr()  # keyword arguments only from Python 3.12
_SHOWN.maxlevel, _SHOWN.maxlist, _SHOWN.maxtuple, _SHOWN.maxdict = 2, 4, 4, 4
_SHOWN.maxstring = _SHOWN.maxother = 60


def shown(value: object) -> str:
    """A value for an error message: its repr, bounded (a billion-laughs alias or a 200 MB
    string must not become a 2 GB message)."""
    return _SHOWN.repr(value)


class WorkerError(Exception):
    """Base of every error `worker` raises on purpose."""


class UsageError(WorkerError):
    """The operator's input cannot be used as given; nothing was sent."""


class JobFileError(UsageError):
    """One or more problems in a job file or targets file, each a full sentence with a fix."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = problems
        super().__init__("\n".join(problems))


class InvalidTargetError(UsageError):
    """A target that cannot be turned into a request; refused before anything is sent."""


class StoreError(WorkerError):
    """A file of the run directory cannot be written completely: the disk is full, a
    permission was lost, an I/O error. Mid-run it stops the run (exit 3, resumable) and nothing
    that depends on the lost record is written; before anything is sent it is a usage error's
    kin (the caller decides the exit code). The message names the path, the cause and the fix.
    """

    def __init__(self, path: object, cause: str) -> None:
        self.path = path
        self.cause = cause
        super().__init__(
            f"cannot write {path}: {cause}; free space or fix the permissions, then resume "
            "(nothing already written is lost)"
        )


class EnOSError(WorkerError):
    """An answer (or the lack of one) from the gateway, with what is known of it.

    `maybe_applied` is true when the request may have reached the service and taken effect
    although no usable answer came back (timeout, dropped connection, truncated body, 5xx).
    """

    maybe_applied: bool = False

    def __init__(
        self,
        message: str,
        *,
        http_status: int | None = None,
        code: int | None = None,
        request_id: str | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.http_status = http_status
        self.code = code
        self.request_id = request_id

    @property
    def label(self) -> str:
        """A short key for counting errors: the EnOS code, else the HTTP status, else the kind."""
        if self.code is not None:
            return str(self.code)
        if self.http_status is not None:
            return f"http_{self.http_status}"
        return type(self).__name__


class RetryableError(EnOSError):
    """A failure that another attempt may fix."""

    def __init__(
        self,
        message: str,
        *,
        maybe_applied: bool,
        http_status: int | None = None,
        code: int | None = None,
        request_id: str | None = None,
    ) -> None:
        super().__init__(message, http_status=http_status, code=code, request_id=request_id)
        self.maybe_applied = maybe_applied


class RateLimitedError(RetryableError):
    """HTTP 429: the gateway asks everyone to slow down, for `retry_after` seconds if it said.

    `budget` is what the answer's headers stated (the client fills it in; None: nothing).
    """

    budget: Budget | None = None

    def __init__(self, message: str, *, retry_after: float | None, request_id: str | None) -> None:
        super().__init__(message, maybe_applied=False, http_status=429, request_id=request_id)
        self.retry_after = retry_after


class QuotaPausedError(RateLimitedError):
    """A 429 met while the whole run waits for the gateway's quota (a spent window): the run's
    wait, not this target's failure, so it uses none of the target's attempts or throttle
    allowance. `retry_after` is the time left until the run tries again."""

    @classmethod
    def during(cls, error: RateLimitedError, wait_s: float, why: str) -> QuotaPausedError:
        """`error` as met during a quota pause that ends in `wait_s` seconds, for `why`."""
        paused = cls(f"{error.message}; {why}", retry_after=wait_s, request_id=error.request_id)
        paused.budget = error.budget
        return paused


class OversizedAnswerError(RetryableError):
    """An answer larger than the client reads (after decompression): not read; it may have
    taken effect. A device search answers it with smaller pages."""


class TargetError(EnOSError):
    """Final for this target (bad parameter, unknown device, unexpected code); no retry."""


class UnreadableAnswerError(TargetError):
    """The client could not turn an answer into a reply (a bug, or an answer no rule foresaw).

    The request may well have taken effect, so its target ends `failed` with the effect
    unknown, and the run goes on.
    """

    maybe_applied = True


class FatalError(EnOSError):
    """Nothing else in this run can succeed; stop without sending the rest."""


class AuthError(FatalError):
    """The credentials or the access token were rejected, also after one renewal."""


class PermissionDeniedError(FatalError):
    """The application may not act on this organisation or resource (99403, HTTP 403)."""


class ExitCode(IntEnum):
    """The contract's exit codes of `worker run` (design.md); other commands use a subset."""

    OK = 0  # every target cancelled or had nothing to cancel
    FAILED = 1  # finished; some targets failed
    USAGE = 2  # bad usage or job file: nothing was sent
    ABORTED = 3  # fatal error, abort rule, outage, internal error: resumable
    INTERRUPTED = 4  # signal or deadline: resumable
