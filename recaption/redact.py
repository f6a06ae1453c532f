"""Credentials never leave the process: URIs and text are scrubbed of secrets before anything is written or printed.

A URI can carry credentials in its user-info (`s3://KEY:SECRET@bucket/...`) or in query parameters
(`?access_key=...&secret_key=...`, a presigned URL's `X-Amz-Signature`, a SAS `sig`). `strip_credentials` removes
them, so what the project stores (run metadata, markers, reports) is still a usable URI once the credentials come
from the environment; `redact_text` scrubs any text (errors, log lines, tracebacks) where such a URI may appear.
"""

from __future__ import annotations

import logging
import re
from typing import Any
from urllib.parse import unquote, urlsplit, urlunsplit

REDACTED = "***"
# Query parameter names that carry a secret: keys, secrets, tokens, passwords, signatures, credentials.
_SECRET_PARAM = re.compile(
    r"(secret|token|passw(or)?d|pwd|signature|credential|auth|session|(access|api|account|private|sas)[_-]?key)",
    re.IGNORECASE,
)
# Short names that are secrets in a URI's query (`?key=` of an API, `?sig=` of a SAS URL) but too common in text.
_URI_ONLY = {"key", "sig", "sv", "se"}
# Parameters with those words that are not secrets (pyarrow's S3/GCS connection options).
_NOT_SECRET = {"endpoint_override", "region", "scheme", "allow_bucket_creation", "allow_bucket_deletion"}
_URI = re.compile(r"\b([A-Za-z][A-Za-z0-9+.-]*://)([^\s'\"<>]*)")
_USERINFO = re.compile(r"^([^/?#@]*)@")
_TEXT_PARAM = re.compile(r"([?&;\s]|^)([A-Za-z0-9_.-]+)=([^&\s'\"<>;,)]*[^&\s'\"<>;,):.])")


def is_secret_param(name: str, in_uri: bool = True) -> bool:
    """Whether a `name=value` pair carries a secret; short generic names only count inside a URI's query."""
    lower = name.lower()
    if lower in _NOT_SECRET:
        return False
    return bool(_SECRET_PARAM.search(name)) or (in_uri and lower in _URI_ONLY)


def strip_credentials(uri: str) -> str:
    """`uri` without user-info and without secret query parameters (the others stay); a non-URI as it is."""
    if "://" not in uri:
        return uri
    try:
        p = urlsplit(uri)
    except ValueError:
        return redact_text(uri)
    netloc = p.netloc.rsplit("@", 1)[-1]
    # The kept parameters keep their text as written (no re-encoding), so equal URIs stay equal.
    query = "&".join(q for q in p.query.split("&") if q and not is_secret_param(unquote(q.split("=", 1)[0])))
    return urlunsplit((p.scheme, netloc, p.path, query, p.fragment))


def redact_text(text: str) -> str:
    """`text` with the user-info of every URI in it and every secret-looking `name=value` replaced by ***."""
    if not text:
        return text

    def param(m: re.Match, in_uri: bool) -> str:
        sep, name, value = m.groups()
        return f"{sep}{name}={REDACTED}" if value != REDACTED and is_secret_param(name, in_uri) else m.group(0)

    def uri(m: re.Match) -> str:
        rest = _USERINFO.sub(REDACTED + "@", m.group(2))
        return m.group(1) + _TEXT_PARAM.sub(lambda p: param(p, True), rest)

    return _TEXT_PARAM.sub(lambda p: param(p, False), _URI.sub(uri, text))


def redact_config(data: Any) -> Any:
    """A copy of a nested config (dicts, lists, strings) with the credentials stripped from every URI in it."""
    if isinstance(data, dict):
        return {k: redact_config(v) for k, v in data.items()}
    if isinstance(data, list):
        return [redact_config(v) for v in data]
    if isinstance(data, str) and "://" in data:
        return strip_credentials(data)
    return data


class RedactingFilter(logging.Filter):
    """A logging filter that scrubs each record's final message (arguments and traceback included)."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        clean = redact_text(message)
        if clean != message:
            record.msg, record.args = clean, None
        if record.exc_text:
            record.exc_text = redact_text(record.exc_text)
        return True


def install_log_redaction(logger: logging.Logger | None = None) -> None:
    """Scrubs every record that reaches the handlers of `logger` (default: the root logger)."""
    for handler in (logger or logging.getLogger()).handlers:
        if not any(isinstance(f, RedactingFilter) for f in handler.filters):
            handler.addFilter(RedactingFilter())
