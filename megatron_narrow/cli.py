"""How every command-line entry point reports a refused input: one `error:` line naming the file and the fix.

A user who hands us a bad file wants the file's name and what to do, not forty lines of traceback; an
engineer chasing a bug wants the traceback. `--debug` or MEGATRON_NARROW_DEBUG=1 prints it before the line
(every tool's --help says so).

Exit codes (the same in every tool): 2 for a refused input or config (usage error), 1 for bad data
(`DataError`: a corpus, shard or manifest that is wrong) and for a run that failed after it started.
"""

from __future__ import annotations

import os
import sys
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager

DEBUG_ENV = "MEGATRON_NARROW_DEBUG"
EXIT_DATA_ERROR = 1
EXIT_USAGE_ERROR = 2


def debug_requested(argv: list[str] | None = None) -> bool:
    """Whether the user asked for tracebacks: `--debug` on the command line or MEGATRON_NARROW_DEBUG=1."""
    args = sys.argv[1:] if argv is None else argv
    return "--debug" in args or os.environ.get(DEBUG_ENV, "") not in ("", "0")


class RunRefused(ValueError):
    """A run that cannot start with its config or inputs: one `error:` line and exit code 2. Training entry
    points turn errors into it only around their set-up (`refusing()`), so that a ValueError raised while
    training, which is a bug, keeps its traceback."""


@contextmanager
def refusing() -> Iterator[None]:
    """Inside: a ValueError or OSError (a bad config, file or dataset) becomes a RunRefused with its message."""
    try:
        yield
    except RunRefused:
        raise
    except (ValueError, OSError) as error:
        raise RunRefused(error_message(error)) from error


def error_message(error: BaseException) -> str:
    message = str(error) or type(error).__name__
    if isinstance(error, FileNotFoundError) and error.filename and str(error.filename) not in message:
        message = f"{error.filename}: {message}"
    return message


def report_error(error: BaseException, *, debug: bool) -> None:
    """Print one `error:` line (the traceback before it when debugging)."""
    if debug:
        traceback.print_exception(error, file=sys.stderr)
    print(f"error: {error_message(error)}", file=sys.stderr)


def exit_code(error: BaseException) -> int:
    """1 for bad data, 2 for a refused input or config."""
    from megatron_narrow.data.shards import DataError

    return EXIT_DATA_ERROR if isinstance(error, DataError) else EXIT_USAGE_ERROR


def run_cli(main: Callable[[], int | None], argv: list[str] | None = None) -> int:
    """Run a tool's main; refusals (ValueError, OSError) become one line and an exit code."""
    try:
        return main() or 0
    except (ValueError, OSError) as error:  # DataError, CheckpointError and TaskDataError are ValueErrors
        report_error(error, debug=debug_requested(argv))
        return exit_code(error)
