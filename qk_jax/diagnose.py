r"""Does the MMDiT copy from its in-context images? Attention shares per layer and head, kept/changed losses.

USAGE: python -m qk_jax.diagnose --checkpoint DIR [--task edit] [--num 16] [--t 0.9] [--seed 0] [--out FILE.json]

What each share means: ``qk_jax.evaluation.attention_maps``.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from absl import app, flags

from qk_jax import cli, sampling
from qk_jax.evaluation import attention_maps


def define_flags(fv: flags.FlagValues) -> None:
    kw = dict(flag_values=fv)
    flags.DEFINE_string("checkpoint", None, "A stage-3 model directory (a stage's final/).", required=True, **kw)
    flags.DEFINE_enum("task", "edit", attention_maps.TASKS, "The task whose held-out samples to read.", **kw)
    flags.DEFINE_integer("num", 16, "Held-out samples.", lower_bound=1, **kw)
    flags.DEFINE_float("t", 0.9, "Noise level of the probe, in (0, 1].", **kw)
    flags.DEFINE_integer("seed", 0, "Sample and noise seed.", **kw)
    flags.DEFINE_string("out", None, "Also write the report as JSON here.", **kw)


def run_flags(fv: flags.FlagValues) -> dict[str, Any]:
    """Diagnoses as the parsed flags say; prints the report and returns it."""
    try:
        sampler = sampling.Sampler.from_checkpoint(fv.checkpoint)
    except (ValueError, FileNotFoundError) as e:  # not a model directory, or params that do not fit its config
        raise app.UsageError(str(e)) from None
    report = attention_maps.copy_report(sampler, fv.task, fv.num, fv.t, fv.seed)
    print(attention_maps.markdown(report), flush=True)
    if fv.out:
        with open(fv.out, "w") as f:
            json.dump(report, f, indent=1)
    return report


def main(argv: Sequence[str]) -> dict[str, Any]:
    """``python -m qk_jax.diagnose`` in-process: ``main(['--checkpoint', DIR, '--num', '4'])``."""
    return cli.in_process("qk_jax.diagnose", define_flags, run_flags, argv)


if __name__ == "__main__":
    cli.run_as_program(define_flags, run_flags)
