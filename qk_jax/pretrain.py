r"""Stage 0 alone: the ShapesWorld VAE and VLM that stage 1 imports (``python -m qk_jax.train`` runs it first).

USAGE: python -m qk_jax.pretrain --config configs/shapes.py[:tiny] --workdir DIR     (writes DIR/stage0)

What it trains and measures: ``qk_jax.training.stage0``.
"""

from __future__ import annotations

from collections.abc import Sequence

from absl import app, flags
from ml_collections import config_flags

from qk_jax import cli, storage
from qk_jax.training import stage0


def define_flags(fv: flags.FlagValues) -> None:
    config_flags.DEFINE_config_file("config", None, "A curriculum config with a stage0 block: configs/shapes.py.",
                                    lock_config=False, flag_values=fv)
    flags.DEFINE_string("workdir", None, "The curriculum's workdir; stage 0 goes to <workdir>/stage0.", flag_values=fv)


def run_flags(fv: flags.FlagValues) -> stage0.Result:
    if fv.config is None or not fv.workdir:
        raise app.UsageError("give --config configs/shapes.py[:tiny] and --workdir DIR")
    try:
        return stage0.run(fv.config, storage.join(fv.workdir, stage0.DIRNAME))
    except stage0.NoStage0Error as e:
        raise app.UsageError(str(e)) from None


def main(argv: Sequence[str]) -> stage0.Result:
    """``python -m qk_jax.pretrain`` in-process."""
    return cli.in_process("qk_jax.pretrain", define_flags, run_flags, argv)


if __name__ == "__main__":
    cli.run_as_program(define_flags, run_flags)
