r"""Benchmark the input pipeline: samples per second of ShapesWorld and 512 px JPEG records, JSONL and ArrayRecord.

USAGE: python -m qk_jax.data.bench_data [--workers N ...] [--batches N] [--cases CASE ...] [--records N]

  python -m qk_jax.data.bench_data --workers 0 --workers 2 --batches 30 --cases shapes --cases jpeg-edit

The cases and how they are timed: ``qk_jax.perf.data``.
"""

from __future__ import annotations

from collections.abc import Sequence

from absl import flags

from qk_jax import cli
from qk_jax.perf import data


def define_flags(flag_values: flags.FlagValues) -> None:
    """The command's flags, on ``flag_values`` (``qk_jax.cli``)."""
    fv = dict(flag_values=flag_values)
    flags.DEFINE_multi_integer("workers", [0, 2], "Pipeline worker processes (repeat the flag for several).",
                               lower_bound=0, **fv)
    flags.DEFINE_integer("batches", 30, "Timed batches per measurement (after 3 warm-up batches).", lower_bound=1,
                         **fv)
    flags.DEFINE_multi_enum("cases", list(data.CASES), data.CASES, "What to read (repeat the flag for several).",
                            **fv)
    flags.DEFINE_integer("records", 1000, "Records per generated dataset.", lower_bound=1, **fv)


def run_flags(fv: flags.FlagValues) -> list[str]:
    """Runs the benchmark, printing each line as it is measured; returns the lines."""
    lines = []
    for line in data.run(fv.cases, fv.workers, fv.batches, fv.records):
        print(line, flush=True)
        lines.append(line)
    return lines


def main(argv: Sequence[str]) -> list[str]:
    """``python -m qk_jax.data.bench_data`` in-process: ``main(['--cases', 'shapes', '--records', '20'])``."""
    return cli.in_process("qk_jax.data.bench_data", define_flags, run_flags, argv)


if __name__ == "__main__":
    cli.run_as_program(define_flags, run_flags)
