"""The ``tireg`` script's entry point (``[project.scripts]`` in ``pyproject.toml``): :func:`main`.

A module of its own, outside the ``tireg`` package: importing anything in ``tireg`` first runs
``tireg/__init__.py``, which imports torch (about 2.5 s), and Ctrl-C in those seconds, before
``tireg.cli.main`` was there to handle it, printed Python's ``KeyboardInterrupt`` traceback.
Here the import is under the command's rule: ``tireg: interrupted; no output written``, status
130.  Only the standard library is imported before that.
"""

from __future__ import annotations

import signal
import sys


def _interrupted() -> int:
    print("tireg: interrupted; no output written", file=sys.stderr)
    return 130


def main() -> int:
    """Import :mod:`tireg.cli` and run its ``main()``; Ctrl-C while it imports is the command's
    interrupt, not a traceback (nothing is written before the command runs)."""
    seen = []

    def interrupt(signum, frame):
        seen.append(signum)  # an import that turns the KeyboardInterrupt into another error is still one
        raise KeyboardInterrupt

    # only over Python's own handler: SIGINT ignored (a background job) stays ignored
    ours = signal.getsignal(signal.SIGINT) is signal.default_int_handler
    if ours:
        signal.signal(signal.SIGINT, interrupt)
    try:
        from tireg.cli import main as command
    except BaseException:
        if not seen:
            raise
    finally:
        if ours and signal.getsignal(signal.SIGINT) is interrupt:
            signal.signal(signal.SIGINT, signal.default_int_handler)
    if seen:
        return _interrupted()
    try:
        return command()
    except KeyboardInterrupt:  # before command() reached its own handling
        return _interrupted()


if __name__ == "__main__":
    sys.exit(main())
