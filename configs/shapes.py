r"""python -m qk_jax.train --config configs/shapes.py --workdir /tmp/qk_shapes

The whole ShapesWorld curriculum, what the README's main command runs: stages 1, 2 and 3 of the paper
(table 3) at CPU scale, one after the other, then the evaluation. Stage ``i`` runs in ``<workdir>/<name>`` and
starts from the last checkpoint of the stage before it: ``init_from`` is relative to ``--workdir``.
The 1024 px upscale (stage 3b) is left out: ShapesWorld gains nothing from more pixels.

``:tiny`` runs the same curriculum at test scale (seconds). Override one stage with an index:
``--config.stages[0].total_steps=100``.
"""

import ml_collections

from configs import common
from configs import stage1
from configs import stage2
from configs import stage3


def get_config(arg=None):
    """The curriculum at the scale named by ``arg``: ``shapes`` (default) or ``tiny``."""
    arg = common.parse_arg(arg, variants=("shapes", "tiny"))
    config = ml_collections.ConfigDict()
    config.world = common.shapes_world()  # one world for every stage and the evaluation
    config.stages = [module.get_config(arg.variant) for module in (stage1, stage2, stage3)]
    for stage in config.stages:
        stage.name = f"stage{stage.stage}"
        stage.data.world = config.world
    for previous, stage in zip(config.stages, config.stages[1:]):
        stage.init_from = previous.name

    # Scored by qk_jax.evaluate on held-out scenes: GenEval-style categories for t2i, success and preservation
    # for edit, identity and placement for custom/multi, both for subject_edit (DESIGN.md). Every sample is
    # drawn once per sampler seed; the report gives the mean and the spread over seeds.
    config.evaluate = ml_collections.ConfigDict(dict(
        tasks=("t2i", "edit", "custom", "multi", "subject_edit"),
        samples_per_task=common.pick(arg.variant, shapes=200, tiny=2),
        seeds=common.pick(arg.variant, shapes=(0, 1, 2), tiny=(0,)),
    ))
    return config
