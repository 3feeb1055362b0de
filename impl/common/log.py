"""Progress lines of long runs (experiments, tuners): ``[<name> HH:MM:SS] message``, flushed at once so a log read
while the run goes on is current.

    log = logger("l2cache")
    log("selection run started")          # [l2cache 14:02:11] selection run started
"""
from __future__ import annotations

import sys
import time
from typing import Callable


def logger(name: str, *, to_stderr: bool = False) -> Callable[[str], None]:
    """A ``log(msg)`` printing ``[name HH:MM:SS] msg`` to stdout (or stderr), the stream looked up at each call."""

    def log(msg: str) -> None:
        print(f"[{name} {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr if to_stderr else sys.stdout, flush=True)

    return log
