"""Score a ShapesWorld checkpoint on held-out prompts of every task (GenEval-style categories, edit preservation,
subject identity); writes report.json, report.md and a grid per task.

USAGE: python -m qk_jax.evaluate --checkpoint DIR --out DIR [--num 200] [--tasks t2i ...] [--untrained | --ceiling]

What each score means: ``qk_jax.evaluation.scoring``.
"""

from __future__ import annotations

from collections.abc import Sequence

from absl import app, flags

from qk_jax import cli, sampling
from qk_jax.data import shapesworld
from qk_jax.evaluation import scoring


def define_flags(fv: flags.FlagValues) -> None:
    """The tool's flags, declared on ``fv`` (``qk_jax.cli``)."""
    kw = dict(flag_values=fv)
    flags.DEFINE_string("checkpoint", None, "A model directory (a stage's final/).", required=True, **kw)
    flags.DEFINE_string("out", None, "Folder for report.json, report.md and the grids.", required=True, **kw)
    flags.DEFINE_enum("split", "test", sorted(shapesworld.SPLITS), "'test' is the held-out one.", **kw)
    flags.DEFINE_integer("num", 200, "Samples per task.", lower_bound=1, **kw)
    flags.DEFINE_integer("seed", 0, "Scene and noise seed (sample k uses noise seed seed + k).", **kw)
    flags.DEFINE_integer("steps", None, "Euler steps (default: the config's sample.steps).", lower_bound=1, **kw)
    flags.DEFINE_integer("batch", 8, "Requests per sampler call.", lower_bound=1, **kw)
    flags.DEFINE_multi_enum("tasks", list(scoring.TASKS), scoring.TASKS, "Tasks to score (repeat the flag for "
                            "several).", **kw)
    flags.DEFINE_bool("untrained", False, "Score the baseline: this config with random VLM, connector and MMDiT"
                      " (scoring.untrained).", **kw)
    flags.DEFINE_bool("ceiling", False, "Score the VAE's reconstructions of the targets, not samples: the bound the"
                      " autoencoder and parse_scene leave to every score (scoring.evaluate).", **kw)
    cli.define_guidance_flags(fv)


def run_flags(fv: flags.FlagValues) -> list[str]:
    """Evaluates as the parsed flags say; prints the markdown report and returns the paths written."""
    if fv.untrained and fv.ceiling:
        raise app.UsageError("--untrained and --ceiling: choose one (the ceiling samples nothing)")
    guidance = dict(cfg_text=fv["cfg-text"].value, cfg_image=fv["cfg-image"].value)
    try:
        scoring.check_guidance(fv.ceiling, **guidance)  # before the checkpoint loads
    except ValueError as e:
        raise app.UsageError(str(e)) from None
    try:
        sampler = sampling.Sampler.from_checkpoint(fv.checkpoint)
    except (ValueError, FileNotFoundError) as e:  # not a model directory, or params that do not fit its config
        raise app.UsageError(str(e)) from None
    if fv.untrained:
        sampler = scoring.untrained(sampler, fv.seed)
    data = sampler.config["data"]
    if "world" not in data:
        raise app.UsageError(f"checkpoint {fv.checkpoint}: its config has no data.world; evaluate a ShapesWorld"
                             " ('shapes' or 'tiny') checkpoint")
    world = shapesworld.World.from_config(data["world"], size=int(data["resolution"]))
    report, rows = scoring.evaluate(sampler, fv.num, fv.seed, world, tuple(fv.tasks), split=fv.split,
                                    steps=fv.steps, batch=fv.batch, ceiling=fv.ceiling, **guidance)
    paths = scoring.write_report(fv.out, report, rows)
    print(scoring.markdown(report))
    return paths


def main(argv: Sequence[str]) -> list[str]:
    """``python -m qk_jax.evaluate`` in-process: ``main(['--checkpoint', DIR, '--out', OUT, '--num', '2'])``."""
    return cli.in_process("qk_jax.evaluate", define_flags, run_flags, argv)


if __name__ == "__main__":
    cli.run_as_program(define_flags, run_flags)
