r"""The paper's ablations (tables 8, 9 and the source offset) as variants of the ShapesWorld curriculum, in one table.

USAGE: python -m qk_jax.ablate --config configs/shapes.py --workdir runs/shapes [--which conditioning ...] [--steps N]

Run the curriculum in the same --workdir first. What each ablation compares: ``qk_jax.training.ablations``.
"""

from __future__ import annotations

from collections.abc import Sequence

from absl import app, flags
from ml_collections import config_flags

from qk_jax import cli
from qk_jax.training import ablations


def define_flags(fv: flags.FlagValues) -> None:
    kw = dict(flag_values=fv)
    config_flags.DEFINE_config_file("config", None, "The curriculum config: configs/shapes.py[:tiny].",
                                    lock_config=False, **kw)
    flags.DEFINE_string("workdir", None, "The curriculum's --workdir (its stage 0, data and stage2/final).", **kw)
    flags.DEFINE_multi_enum("which", list(ablations.ABLATIONS), list(ablations.ABLATIONS), "Ablations to run.", **kw)
    flags.DEFINE_integer("steps", None, "Training steps per variant (default: the stage's own).", **kw)
    flags.DEFINE_integer("num", 50, "Held-out samples per evaluated task.", lower_bound=1, **kw)
    flags.DEFINE_integer("seed", 0, "Evaluation seed.", **kw)


def run_flags(fv: flags.FlagValues) -> str:
    if fv.config is None or not fv.workdir or "stages" not in fv.config:
        raise app.UsageError("give --config configs/shapes.py (a curriculum) and --workdir (where it ran)")
    try:
        table = ablations.run_ablations(fv.config, fv.workdir, fv.which, steps=fv.steps, num=fv.num, seed=fv.seed)
    except FileNotFoundError as e:
        raise app.UsageError(str(e)) from None
    print(table)
    return table


def main(argv: Sequence[str]) -> str:
    """``python -m qk_jax.ablate`` in-process."""
    return cli.in_process("qk_jax.ablate", define_flags, run_flags, argv)


if __name__ == "__main__":
    cli.run_as_program(define_flags, run_flags)
