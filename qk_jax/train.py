r"""Train Query-Kontext: one stage, or a whole curriculum (stage 0, stages 1 -> 2 -> 3, the evaluation).

USAGE: python -m qk_jax.train --config configs/stageN.py[:variant] --workdir DIR [--config.key=value ...]

  python -m qk_jax.train --config configs/shapes.py --workdir runs/shapes        # the ShapesWorld curriculum
  python -m qk_jax.train --config configs/stage3.py:shapes --workdir /tmp/stage3 --config.optim.lr=1e-4

Rerunning the same command resumes from the last checkpoint. How a stage runs: ``qk_jax.training.loop``; the
curriculum: ``qk_jax.training.curriculum``.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
from absl import app, flags, logging
from ml_collections import config_flags

from qk_jax import cli, storage
from qk_jax.data import processors
from qk_jax.models import saved_model
from qk_jax.parallel import distributed
from qk_jax.training import checkpoint, curriculum, loop
from qk_jax.training import metrics as metrics_lib


def define_flags(fv: flags.FlagValues) -> None:
    config_flags.DEFINE_config_file("config", None, "A config file: configs/stageN.py[:variant] or configs/shapes.py.",
                                    lock_config=False, flag_values=fv)
    flags.DEFINE_string("workdir", None, "Where checkpoints, metrics and the final model go.", flag_values=fv)


def run_flags(fv: flags.FlagValues) -> None:
    config, workdir = fv.config, fv.workdir
    if config is None or not workdir:
        raise app.UsageError("give --config configs/stageN.py[:variant] (or configs/shapes.py) and --workdir DIR")
    workdir = storage.resolve(workdir)  # gs://bucket/run stays a URI
    if "stages" not in config:
        try:  # before anything is built: a paper config without Qwen's tokenizer must not train on stand-in ids
            processors.tokenizer_folder(config)
        except ValueError as e:
            raise app.UsageError(str(e)) from None
    process, processes = distributed.initialize_from_environment()  # multi-host: SLURM, a TPU pod, JAX_* env
    if processes > 1:
        logging.info("process %d of %d, %d of %d devices here", process, processes, jax.local_device_count(),
                     jax.device_count())
    logging.info("compilation cache: %s", loop.use_compilation_cache(workdir))
    if process == 0:
        path = metrics_lib.save_run_config(config, workdir)
        logging.info("config: %s (all of it: %s)", metrics_lib.config_summary(config), path)
    try:
        if "stages" in config:
            curriculum.run_curriculum(config, workdir)
        else:
            loop.train_stage(config, workdir)
    except (saved_model.CheckpointMismatchError, saved_model.NotAModelError, checkpoint.CheckpointDamagedError,
            loop.BatchShapeMismatch) as e:
        # a workdir, init_from or data that does not fit the config: the message says what to do
        raise app.UsageError(str(e)) from None
    except loop.Stopped as e:  # a preemption: the step is saved; exit 0 so that a pod scheduler restarts the job
        logging.warning("%s", e)


def main(argv: Sequence[str]) -> None:
    """``python -m qk_jax.train`` in-process: ``main(['--config', 'configs/shapes.py:tiny', '--workdir', DIR])``."""
    return cli.in_process("qk_jax.train", define_flags, run_flags, argv)


if __name__ == "__main__":
    cli.run_as_program(define_flags, run_flags)
