"""One redaction for every secret vitq could print, log or write: URL passwords and secret query parameters.

``redact(text)`` replaces the password of any ``scheme://user:password@host`` (the password may hold ``@``, ``:``
or percent-escapes: everything up to the last ``@`` before the host counts) and the value of ``password=``,
``passwd=``, ``pwd=``, ``token=``, ``secret=``, ``api_key=``, ``access_key=`` ... parameters with ``***``.
:func:`install_log_redaction` applies it to every log record; :func:`redact_tree` to files already written.
"""

from __future__ import annotations

import logging
import re
import sys
from pathlib import Path
from typing import NoReturn

__all__ = ["MASK", "fail", "install_log_redaction", "redact", "redact_tree", "say"]

MASK = "***"
_SECRET_KEYS = r"(?:password|passwd|pwd|pass|token|secret|api[_-]?key|access[_-]?key|secret[_-]?key|auth)"
# scheme://user:password@host — the userinfo runs to the last '@' before the next '/', '?', '#', space or quote
# (Hydra escapes ':' and '=' in the overrides it logs as '\:' and '\=': both forms are matched)
_USERINFO = re.compile(r"(?P<head>\b[a-zA-Z][a-zA-Z0-9+.\-]*\\?://[^\s/?#@:'\"\\]*\\?:)(?P<pw>[^\s/?#'\"]*)@"
                       r"(?=[^\s@/?#'\"]+)")
_PARAM = re.compile(rf"(?P<head>(?:[?&;]|\b){_SECRET_KEYS}(?:%3[dD]|\\?=))(?P<value>[^&\s;'\"#]+)", re.IGNORECASE)


def redact(text: object) -> str:
    """``text`` with every URL password and secret query parameter replaced by ``***``."""
    s = str(text)
    s = _USERINFO.sub(lambda m: f"{m.group('head')}{MASK}@" if m.group("pw") else m.group(0), s)
    return _PARAM.sub(lambda m: f"{m.group('head')}{MASK}", s)


class _RedactingFactory:
    """A log-record factory that redacts each record's final message (survives handler reconfiguration)."""

    def __init__(self, inner: object) -> None:
        self.inner = inner

    def __call__(self, *args: object, **kwargs: object) -> logging.LogRecord:
        record = self.inner(*args, **kwargs)  # type: ignore[operator]
        try:
            message = record.getMessage()
        except Exception:  # noqa: BLE001 - a malformed record is left to logging's own error path
            return record
        clean = redact(message)
        if clean != message:
            record.msg, record.args = clean, ()
        return record


def install_log_redaction() -> None:
    """Redact every log record from now on (idempotent)."""
    current = logging.getLogRecordFactory()
    if not isinstance(current, _RedactingFactory):
        logging.setLogRecordFactory(_RedactingFactory(current))


def redact_tree(root: str | Path, patterns: tuple[str, ...] = ("*.yaml", "*.log", "*.json")) -> None:
    """Rewrite the files under ``root`` that match ``patterns`` with their secrets redacted."""
    root = Path(root)
    if not root.exists():
        return
    files = [root] if root.is_file() else [p for pat in patterns for p in root.rglob(pat)]
    for path in files:
        try:
            text = path.read_text()
        except (OSError, UnicodeDecodeError):
            continue
        clean = redact(text)
        if clean != text:
            path.write_text(clean)


def say(message: object) -> None:
    """One line ``vitq: MESSAGE`` on stderr, secrets redacted, first line only."""
    lines = redact(message).strip().splitlines()
    print(f"vitq: {lines[0] if lines else ''}", file=sys.stderr, flush=True)


def fail(message: object, code: int = 2) -> NoReturn:
    """:func:`say` the message and exit with ``code`` (2: bad input, 1: failed trials)."""
    say(message)
    raise SystemExit(code)
