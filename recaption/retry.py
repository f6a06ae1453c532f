"""Transient storage errors (a dropped connection, a throttled or briefly unavailable object store) are retried with
exponential backoff before they fail anything; permanent ones (missing file, no permission, full disk) are not."""

from __future__ import annotations

import errno
import logging
import random
import time
from collections.abc import Callable
from typing import TypeVar

from recaption.redact import redact_text

log = logging.getLogger(__name__)

T = TypeVar("T")

# What S3/GCS clients, curl and sockets say when trying again may well work.
_TRANSIENT_TEXT = (
    "timed out",
    "timeout",
    "connection reset",
    "connection aborted",
    "connection refused",
    "broken pipe",
    "temporarily unavailable",
    "temporary failure",
    "try again",
    "slowdown",
    "slow down",
    "throttl",
    "serviceunavailable",
    "service unavailable",
    "internalerror",
    "internal error",
    "requesttimeout",
    "http response code 500",
    "http response code 502",
    "http response code 503",
    "http response code 504",
    # pyarrow's S3 errors name the AWS SDK's error kind: "AWS Error SERVICE_UNAVAILABLE during GetObject operation"
    "service_unavailable",
    "slow_down",
    "internal_failure",
    "http status 500",
    "http status 502",
    "http status 503",
    "http status 504",
    "curl error",
    "couldn't connect",
    "could not connect",
    "unable to connect",
    "network",
)
_TRANSIENT_ERRNO = {
    errno.ECONNRESET,
    errno.ECONNABORTED,
    errno.ECONNREFUSED,
    errno.ETIMEDOUT,
    errno.EPIPE,
    errno.EAGAIN,
}
_PERMANENT_ERRNO = {errno.ENOSPC, errno.EDQUOT, errno.EACCES, errno.EPERM, errno.ENOENT, errno.EROFS, errno.EISDIR}


def is_transient(exc: BaseException) -> bool:
    """Whether `exc` is a storage error that a later attempt may not meet."""
    code = getattr(exc, "errno", None)
    if code in _PERMANENT_ERRNO or isinstance(exc, FileNotFoundError | PermissionError | IsADirectoryError):
        return False
    if code in _TRANSIENT_ERRNO or isinstance(exc, ConnectionError | TimeoutError):
        return True
    if not isinstance(exc, OSError) and type(exc).__module__.split(".")[0] != "pyarrow":
        return False
    text = str(exc).lower()
    return any(t in text for t in _TRANSIENT_TEXT)


def with_retries(
    fn: Callable[[], T],
    what: str,
    attempts: int = 5,
    base_s: float = 0.5,
    max_s: float = 16.0,
    sleep: Callable[[float], None] = time.sleep,
) -> T:
    """`fn()`, tried up to `attempts` times while it raises transient errors (backoff base_s·2^k with jitter, at most
    max_s); the last error, or any permanent one, is raised as it is."""
    for attempt in range(1, attempts + 1):
        try:
            return fn()
        except Exception as e:
            if attempt == attempts or not is_transient(e):
                raise
            delay = min(max_s, base_s * 2 ** (attempt - 1)) * (0.5 + random.random() / 2)
            log.warning(
                "%s: %s (attempt %d of %d; again in %.1f s)",
                what,
                redact_text(f"{type(e).__name__}: {e}"),
                attempt,
                attempts,
                delay,
            )
            sleep(delay)
    raise AssertionError("unreachable")
