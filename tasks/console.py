"""What the BIDS App prints while it works: time-stamped progress lines at the chosen verbosity.

The verbosity travels in an environment variable, so that the stages' hooks and progress, which run in worker
processes or cluster jobs, follow the command line's ``-q``/``-v`` too.
"""

from __future__ import annotations

import os
import sys
import time

VERBOSITY_ENV = "DWIFLOW_VERBOSITY"
QUIET, NORMAL, VERBOSE = -1, 0, 1
PREFIX = "[dwiflow]"


def verbosity() -> int:
    """The current verbosity: -1 (``-q``: warnings and errors only), 0, or 1 (``-v``: stage progress too)."""
    try:
        return int(os.environ.get(VERBOSITY_ENV, NORMAL))
    except ValueError:
        return NORMAL


def set_verbosity(level: int) -> None:
    """Set the verbosity for this process and every worker process or job it starts."""
    os.environ[VERBOSITY_ENV] = str(int(level))


def say(line: str, level: int = NORMAL) -> None:
    """Print one progress line (``[dwiflow] …``) with the wall-clock time, if the verbosity is at least ``level``."""
    if verbosity() < level:
        return
    stamp = time.strftime("%H:%M:%S")
    if line.startswith(PREFIX):
        line = f"[dwiflow {stamp}]{line[len(PREFIX):]}"
    else:
        line = f"[dwiflow {stamp}] {line}"
    # one write of the whole line: worker processes print to the same stream, and print() writes the line and its
    # end separately, so two processes' lines could interleave ("…done[dwiflow …] …\n\n")
    _write_line(sys.stdout, line)


def tell(text: str) -> None:
    """Print a command's result (e.g. what it wrote) on standard output; if its reader has gone, as with
    :func:`say`, nothing fails."""
    _write_line(sys.stdout, text)


def complain(line: str) -> None:
    """Print one warning or error line (``dwiflow: warning: …``) on standard error, in one write; if its reader has
    gone, the work goes on, as with :func:`say`."""
    _write_line(sys.stderr, line)


def _write_line(stream, line: str) -> None:
    try:
        stream.write(line + "\n")
        stream.flush()
    except BrokenPipeError:
        _stream_gone(stream)


def _stream_gone(stream) -> None:
    """The reader of a stream has gone (``dwiflow … 2>&1 | head``, a log process that ended): the work goes on
    without it. The stream becomes the null device for the rest of the process, so that neither a later line nor
    the interpreter's last flush fails (a warning printed during a run made the run fail with 'Broken pipe')."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, stream.fileno())
    finally:
        os.close(devnull)


class StageProgress:
    """A stage's progress callback (``done``, ``total``) that prints at most every ``interval`` seconds, with the
    elapsed time: long fits show they are moving (``-v`` prints more often)."""

    def __init__(self, label: str, stage: str, unit: str, interval: float | None = None) -> None:
        self.label, self.stage, self.unit = label, stage, unit
        self.interval = interval if interval is not None else (5.0 if verbosity() >= VERBOSE else 20.0)
        self.start = time.monotonic()
        self.last = self.start

    def __call__(self, done: int, total: int) -> None:
        now = time.monotonic()
        if now - self.last < self.interval or done >= total:
            return
        self.last = now
        say(f"[dwiflow]   {self.label}: {self.stage} {done}/{total} {self.unit} ({now - self.start:.0f} s)")
