"""The ``wsurgery`` entry point: every outcome is one line on stderr and an exit status.

This module imports only the standard library, ``wsurgery.interrupts`` and ``wsurgery.errors`` (whose
``fail`` the commands share): ``main`` installs the SIGINT/SIGTERM/SIGHUP handlers before it imports the
commands (and torch with them), so that even a Ctrl-C during start-up ends in one line, not a traceback.
The commands are in ``wsurgery.commands``.
"""

from __future__ import annotations

import signal
import sys
from typing import NoReturn

from . import interrupts
from .errors import WsurgeryError, fail


def _interrupted() -> NoReturn:
    """Exit 128 + the signal's number, saying whether an output was complete before the signal came."""
    interrupts.stop_raising()
    signum = interrupts.stopped_by() or signal.SIGINT
    written = interrupts.outputs_written()
    what = (f"{', '.join(map(str, written))} had been written completely" if written
            else "no output was left behind")
    fail(f"interrupted ({signal.Signals(signum).name}); {what}", 128 + signum)


def _run(args: list[str]) -> None:
    import click

    from .commands import cli

    debug = "--debug" in args
    try:
        cli.main(args=args, prog_name="wsurgery", standalone_mode=False, obj={"argv": args})
    except click.exceptions.Exit as e:
        sys.exit(e.exit_code)
    except click.UsageError as e:  # one line too, not click's usage block
        hint = f" (see '{e.ctx.command_path} --help')" if e.ctx is not None else ""
        fail(f"error: {e.format_message().rstrip('.')}{hint}", e.exit_code)
    except click.ClickException as e:
        interrupts.stop_raising()
        e.show()
        sys.exit(e.exit_code)
    except click.exceptions.Abort:  # click's form of KeyboardInterrupt
        _interrupted()
    except WsurgeryError as e:
        if debug:
            raise
        fail(f"error: {e}")
    except OSError as e:  # disk full, permissions...: about the user's system, not a bug
        if debug:
            raise
        where = f"{e.filename}: " if e.filename else ""
        fail(f"error: {where}{e.strerror or e}")
    except Exception as e:  # a bug: still one line
        if debug:
            raise
        fail(f"internal error: {type(e).__name__}: {e} (rerun with --debug for details)")
    interrupts.stop_raising()


def main(argv: list[str] | None = None) -> None:
    """Entry point: errors become one line on stderr and a non-zero exit, unless --debug; SIGINT,
    SIGTERM and SIGHUP exit 130, 143 and 129. Called as the program (``argv`` None), signals stay
    ignored on the way out; called in-process, the caller's handlers are put back."""
    args = sys.argv[1:] if argv is None else [str(a) for a in argv]
    try:
        with interrupts.handling_signals(restore=argv is not None):
            _run(args)
    except KeyboardInterrupt:
        _interrupted()


if __name__ == "__main__":
    main()
