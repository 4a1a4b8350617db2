"""The absl command-line pattern of our tools: ``define_flags(fv)`` declares a tool's flags on a ``FlagValues``,
``run_flags(fv)`` does the work and returns what it wrote. ``in_process`` runs a tool from Python on its own
``FlagValues`` (tests, notebooks: nothing global is touched); ``run_as_program`` is its ``__main__``.

absl's ``app.run`` gives flag parsing, ``--help`` and usage errors; only this glue around it is ours.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from absl import app, flags

DefineFlags = Callable[[flags.FlagValues], None]
RunFlags = Callable[[flags.FlagValues], Any]


def in_process(program: str, define_flags: DefineFlags, run_flags: RunFlags, argv: Sequence[str]) -> Any:
    """``run_flags`` on a fresh ``FlagValues`` parsed from ``argv`` (the flags, without the program name); bad
    flags raise ``flags.Error``."""
    fv = flags.FlagValues()
    define_flags(fv)
    fv([program, *argv])
    return run_flags(fv)


def run_as_program(define_flags: DefineFlags, run_flags: RunFlags, argv: Sequence[str] | None = None) -> None:
    """``app.run`` with the flags on ``flags.FLAGS``; positional arguments are a usage error."""
    define_flags(flags.FLAGS)

    def main(args: Sequence[str]) -> None:
        if len(args) > 1:
            raise app.UsageError(f"unexpected arguments {list(args[1:])}")
        run_flags(flags.FLAGS)

    app.run(main, argv=list(argv) if argv is not None else None)
