"""Logging: journald with structured fields under systemd, stderr otherwise."""

from __future__ import annotations

import logging
import os
import sys


def setup_logging(level: str = "INFO") -> None:
    root = logging.getLogger()
    root.setLevel(level)
    handler: logging.Handler | None = None
    # JOURNAL_STREAM is set by systemd when stderr is connected to the journal.
    if os.environ.get("JOURNAL_STREAM"):
        try:
            from systemd.journal import JournalHandler

            # Extra fields passed as `extra={"QVM_TAP": ...}` become journal fields.
            handler = JournalHandler(SYSLOG_IDENTIFIER="qvmd")
        except ImportError:
            handler = None
    if handler is None:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root.handlers[:] = [handler]
