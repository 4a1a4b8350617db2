"""The one command-line pattern of every ``python -m qk_jax.X`` (absl flags; ml_collections where a config is read).

A command module is thin: a short docstring (one line of what, the usage line, an example: absl prints it above
the flags on ``--help``), ``define_flags(fv)`` declaring its flags on a ``FlagValues``, ``run_flags(fv)`` calling
library code with the parsed values, and at the bottom::

    def main(argv):  # in-process, for tests and notebooks: nothing global is touched
        return cli.in_process("qk_jax.X", define_flags, run_flags, argv)

    if __name__ == "__main__":
        cli.run_as_program(define_flags, run_flags)

A user error is ``app.UsageError("what is wrong; what to do")``: the program prints that one line and exits 2,
without a traceback or the docstring. Only this glue is ours; absl's ``app.run`` does the rest.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from typing import Any

from absl import app, flags, logging

DefineFlags = Callable[[flags.FlagValues], None]
RunFlags = Callable[[flags.FlagValues], Any]


def _action(args: Sequence[str], actions: Sequence[str] | None) -> tuple[str, ...]:
    """The positional arguments a command takes: none, or (with ``actions``) exactly one of them, first."""
    if actions is None:
        if args:
            raise app.UsageError(f"unexpected arguments {list(args)}; every input is a --flag (see --help)")
        return ()
    if len(args) != 1 or args[0] not in actions:
        raise app.UsageError(f"give one action, {' or '.join(actions)}, then its flags (got {list(args) or 'none'})")
    return (args[0],)


def in_process(program: str, define_flags: DefineFlags, run_flags: RunFlags, argv: Sequence[str],
               actions: Sequence[str] | None = None) -> Any:
    """``run_flags`` on a fresh ``FlagValues`` parsed from ``argv`` (the flags, without the program name); bad
    flags raise ``flags.Error``, user errors ``app.UsageError``. A command with ``actions`` (``convert import``
    / ``convert export``) takes one of them as its only positional argument: ``run_flags(fv, action)``."""
    fv = flags.FlagValues()
    define_flags(fv)
    rest = fv([program, *argv])[1:]
    return run_flags(fv, *_action(rest, actions))


def usage_error(message: str, exitcode: int = 2) -> None:
    """Print ``error: message`` (one line, on stderr) and exit: what a command does with a user error."""
    print(f"error: {message}", file=sys.stderr, flush=True)
    sys.exit(exitcode)


def run_as_program(define_flags: DefineFlags, run_flags: RunFlags, argv: Sequence[str] | None = None,
                   actions: Sequence[str] | None = None) -> None:
    """``app.run`` with the flags on ``flags.FLAGS``; unexpected positional arguments and ``app.UsageError`` are
    one line on stderr and exit code 2. ``actions``: as ``in_process``."""
    define_flags(flags.FLAGS)

    def main(args: Sequence[str]) -> None:
        try:
            run_flags(flags.FLAGS, *_action(args[1:], actions))
        except app.UsageError as e:
            logging.flush()
            usage_error(str(e))

    app.run(main, argv=list(argv) if argv is not None else None)


def define_guidance_flags(flag_values: flags.FlagValues) -> None:
    """``--cfg-text`` / ``--cfg-image`` (default: the checkpoint's ``config.sample``), for every tool that samples."""
    flags.DEFINE_float("cfg-text", None, "Text guidance scale (default: config.sample.cfg_text).",
                       flag_values=flag_values)
    flags.DEFINE_float("cfg-image", None, "Image guidance scale (default: config.sample.cfg_image).",
                       flag_values=flag_values)
