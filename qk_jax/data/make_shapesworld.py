r"""Write a ShapesWorld dataset: world.json and train/test manifests with their images.

USAGE: python -m qk_jax.data.make_shapesworld --out DIR --num N [--num-test N] [--seed S] [--size PX] [--tasks T ...]

  python -m qk_jax.data.make_shapesworld --out /tmp/shapes --num 10000 --seed 0 --tasks t2i --tasks edit

The same flags write byte-identical files. The world, the tasks and the files: ``qk_jax.data.shapesworld``.
"""

from __future__ import annotations

from collections.abc import Sequence

from absl import app, flags

from qk_jax import cli
from qk_jax.data import shapesworld


def define_flags(flag_values: flags.FlagValues) -> None:
    """The command's flags, on ``flag_values`` (``qk_jax.cli``)."""
    fv = dict(flag_values=flag_values)
    flags.DEFINE_string("out", None, "Output folder (created).", **fv)
    flags.DEFINE_integer("num", None, "Training samples.", lower_bound=0, **fv)
    flags.DEFINE_integer("num-test", None, "Held-out samples (default: num // 10, at least 1).", lower_bound=0, **fv)
    flags.DEFINE_integer("seed", 0, "Generation seed: sample i is drawn from (seed, i).", **fv)
    flags.DEFINE_integer("size", 64, "Canvas side in pixels.", lower_bound=1, **fv)
    flags.DEFINE_multi_enum("tasks", list(shapesworld.TASKS), shapesworld.TASKS,
                            "Tasks, in their round-robin order (repeat the flag for several; default: all).", **fv)


def run_flags(fv: flags.FlagValues) -> dict[str, tuple[int, str]]:
    """Writes the dataset the flags ask for and prints one line per split; returns ``{split: (samples, path)}``."""
    if fv.out is None or fv.num is None:
        raise app.UsageError("give --out DIR (the dataset folder) and --num N (training samples)")
    written = shapesworld.write_dataset(fv.out, fv.num, num_test=fv["num-test"].value, seed=fv.seed, size=fv.size,
                                        tasks=fv.tasks)
    for split, (num, path) in written.items():
        print(f"{split}: {num} samples -> {path}")
    return written


def main(argv: Sequence[str]) -> dict[str, tuple[int, str]]:
    """``python -m qk_jax.data.make_shapesworld`` in-process: ``main(['--out', '/tmp/shapes', '--num', '100'])``."""
    return cli.in_process("qk_jax.data.make_shapesworld", define_flags, run_flags, argv)


if __name__ == "__main__":
    cli.run_as_program(define_flags, run_flags)
