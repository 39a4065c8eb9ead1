"""Logging to stdout for `docker logs`: text or JSON lines, one line per message.

Nothing here ever formats a key or a password: log calls pass names, domains and reasons.
"""

from __future__ import annotations

import json
import logging
import re
import sys
import time
from typing import Any

log = logging.getLogger("dkim_sidecar")


class _JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "msg": record.getMessage(),
        }
        fields = getattr(record, "fields", None)
        if isinstance(fields, dict):
            out.update(fields)
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, ensure_ascii=False, default=str)


class _TextFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        fields = getattr(record, "fields", None)
        if isinstance(fields, dict) and fields:
            line += " " + " ".join(f"{k}={_text(v)}" for k, v in fields.items() if v is not None)
        return line


# A value goes bare only if it is made of these (addresses, names, numbers, queue IDs); any
# other value is quoted as a JSON string, which also escapes control characters: a value can
# never start a line of its own.
_BARE = re.compile(r"[A-Za-z0-9_.:@,/+\-\[\]]+\Z")


def _text(value: object) -> str:
    s = str(value)
    return s if _BARE.match(s) else json.dumps(s)


def setup_logging(fmt: str = "text", level: int = logging.INFO) -> None:
    # Our lines never show thread or process names, nor the source file and line of the
    # call: not gathering them saves a stack walk and several lookups per message line.
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False
    logging._srcfile = None
    handler = logging.StreamHandler(sys.stdout)
    if fmt == "json":
        handler.setFormatter(_JsonFormatter())
    else:
        handler.setFormatter(_TextFormatter("%(asctime)s %(levelname)s %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)


def setup_cli_logging() -> None:
    """For the commands other than `run`: warnings and errors on stderr, with their fields
    (stdout is the command's answer)."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_TextFormatter("%(levelname)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.WARNING)


def event(level: int, msg: str, **fields: object) -> None:
    """A log line with structured fields (JSON keys, or key=value in text)."""
    log.log(level, msg, extra={"fields": fields})
