"""The commands' front end: user errors, printed as one line with exit code 2, and interruptions."""
from __future__ import annotations

import sys
from typing import Callable, Optional, Sequence


class UserError(Exception):
    """A mistake in the user's input: printed as one line, exit code 2, no traceback."""


def run_main(fn: Callable[[Optional[Sequence[str]]], object], argv: Optional[Sequence[str]] = None) -> None:
    try:
        fn(argv)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr, flush=True)
        sys.exit(2)
    except KeyboardInterrupt:
        print("error: interrupted; nothing half-written was left behind", file=sys.stderr, flush=True)
        sys.exit(130)
