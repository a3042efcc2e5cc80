"""`run(main)`: absl's `app.run` with the project's user errors printed as one line.

    error: data/u.data:17: expected an integer, got '3.x': '1\t3.x\t4\t881250949'

on stderr with exit status 2, no traceback; `--traceback` (or `LLM4REC_TRACEBACK=1`)
re-raises for developers. A flag absl rejects while parsing (a value out of its range,
an unknown flag) is reported the same way. Programming errors are not caught. A process
of a multi-process run that fails exits at once, so the others are not left waiting.
"""

from __future__ import annotations

import functools
import os
import sys
import traceback
from collections.abc import Callable

from absl import app, flags

from eval.distributed import initialize_from_flags
from eval.errors import UserError
from eval.training.flags import validate_ranges

flags.DEFINE_bool("traceback", False, "Show the Python traceback of a user error.")

EXIT_USER_ERROR = 2


def report(error: BaseException) -> None:
    """Prints a user error as the one `error: ...` line."""
    print(f"error: {error}", file=sys.stderr, flush=True)


def _guarded(main: Callable[[list[str]], object]) -> Callable[[list[str]], object]:
    @functools.wraps(main)
    def guarded(argv: list[str]) -> object:
        try:
            joined = initialize_from_flags()
            try:
                return main(argv)
            except BaseException as e:
                if joined:  # the others would wait for this process at jax's shutdown
                    _exit_now(e)
                raise
        except UserError as e:
            if flags.FLAGS.traceback or os.environ.get("LLM4REC_TRACEBACK"):
                raise
            report(e)
            sys.exit(EXIT_USER_ERROR)

    return guarded


def _exit_now(error: BaseException) -> None:
    """Ends a process of a multi-process run at once (no atexit), reporting `error`."""
    if isinstance(error, UserError) and not flags.FLAGS.traceback:
        report(error)
        code = EXIT_USER_ERROR
    elif isinstance(error, SystemExit):
        code = error.code if isinstance(error.code, int) else 1
    else:
        traceback.print_exception(error)
        code = 1
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _parse_flags(argv: list[str]) -> list[str]:
    try:
        return flags.FLAGS(argv)
    except flags.Error as e:
        report(f"{e} (see --helpfull)")
        sys.exit(EXIT_USER_ERROR)


def run(main: Callable[[list[str]], object]) -> None:
    """`app.run(main)`; flags range-checked (`eval.training.flags.RANGES`), bad flags and
    user errors as one line (see module doc); a multi-process run joined first
    (`eval.distributed`)."""
    validate_ranges()
    app.run(_guarded(main), flags_parser=_parse_flags)
