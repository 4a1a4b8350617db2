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

Every program also takes ``--verbose``. Without it the log holds qk_jax's own lines and every library's warnings
and errors, not other libraries' INFO chatter (JAX probing for a TPU on a GPU or CPU host, Orbax's lines per save
and load, matplotlib's font cache, transformers' "PyTorch was not found" notice): ``quiet_logs``. In-process
calls (``in_process``: tests, notebooks) leave the process's logging as it is.
"""

from __future__ import annotations

import logging as pylogging
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any

from absl import app, flags, logging

DefineFlags = Callable[[flags.FlagValues], None]
RunFlags = Callable[[flags.FlagValues], Any]

# Where the lines that are ours come from: the package and the configs installed beside it.
_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))
_OWN_DIRS = (_PACKAGE_DIR + os.sep, os.path.join(os.path.dirname(_PACKAGE_DIR), "configs") + os.sep)


class OwnInfoOnly(pylogging.Filter):
    """Passes every record at WARNING and above, and INFO and below only from qk_jax's own files.

    Orbax and qk_jax both log through absl (the logger is ``absl`` for both), so the record's source file, not
    its logger name, tells them apart."""

    def filter(self, record: pylogging.LogRecord) -> bool:
        return record.levelno >= pylogging.WARNING or os.path.abspath(record.pathname).startswith(_OWN_DIRS)


def quiet_logs() -> None:
    """What a program's log holds without ``--verbose``: ``OwnInfoOnly`` on absl's handler (where JAX's and
    matplotlib's Python loggers end too), and transformers' advisory notices off (it reads the variable when it
    logs one, and no command has imported it yet)."""
    handler = logging.get_absl_handler()
    if not any(isinstance(f, OwnInfoOnly) for f in handler.filters):
        handler.addFilter(OwnInfoOnly())
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")


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
    one line on stderr and exit code 2. ``actions``: as ``in_process``. ``--verbose`` keeps other libraries'
    INFO lines (``quiet_logs``)."""
    define_flags(flags.FLAGS)
    flags.DEFINE_bool("verbose", False, "Also log other libraries' INFO lines (JAX's backend probing, Orbax's saves "
                      "and loads, transformers' notices); their warnings and errors always show.")

    def main(args: Sequence[str]) -> None:
        if not flags.FLAGS.verbose:
            quiet_logs()
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
