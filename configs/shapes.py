r"""python -m qk_jax.train --config configs/shapes.py --workdir /tmp/qk_shapes

The whole ShapesWorld curriculum, what the README's main command runs: stage 0 (``qk_jax.training.stage0``: a VAE
and a VLM pretrained on ShapesWorld, standing in for FLUX.1's autoencoder and Qwen2.5-VL), then stages 1, 2 and
3 of the paper (table 3) at CPU scale, one after the other, then the evaluation. Stage ``i`` runs in
``<workdir>/<name>`` and starts from the last checkpoint of the stage before it: ``init_from`` is relative to
``--workdir``.
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
    config.world = common.shapesworld_block()  # one world for every stage and the evaluation
    config.stages = [module.get_config(arg.variant) for module in (stage1, stage2, stage3)]
    config.wandb = common.wandb_block()  # one block for every stage: --config.wandb.enabled=True logs them all
    for stage in config.stages:
        stage.name = f"stage{stage.stage}"
        stage.data.world = config.world
        stage.wandb = config.wandb
    for previous, stage in zip(config.stages, config.stages[1:]):
        stage.init_from = previous.name

    # Stage 0 (qk_jax.training.stage0): the pretrained VAE and VLM that the paper imports, made here in a few minutes.
    # Writes <workdir>/stage0; stage 1 imports its exports (config.pretrained) and every stage takes its
    # measured latent factors (config.vae.scaling_factor/shift_factor).
    config.stage0 = ml_collections.ConfigDict(dict(
        seed=0,
        eval_samples=common.pick(arg.variant, shapes=128, tiny=4),  # held-out images / descriptions
        log_every=common.pick(arg.variant, shapes=25, tiny=1),
        checkpoint_every=common.pick(arg.variant, shapes=100, tiny=2),
        vae=dict(
            # What matters downstream is whether parse_scene reads a reconstruction as the original scene; the
            # evaluation cannot score above it (``qk_jax.evaluate --ceiling``). Fewer steps leave small triangles
            # without their apex, read as circles. The lr stays up: a decay cost ceiling (docs/shapesworld_log.md:
            # "The VAE ceiling: 3,000 stage-0 steps").
            steps=common.pick(arg.variant, shapes=3000, tiny=3),
            batch_size=common.pick(arg.variant, shapes=16, tiny=2),
            # Random crops: the VAE is convolutional, and a 32 px crop costs a fraction of a 64 px image on CPU
            # (docs/shapesworld_log.md: Evidence moved out of the configs).
            crop=common.pick(arg.variant, shapes=32, tiny=16),
            kl_weight=1e-6,  # LDM's weight on the KL (summed over the latent, per pixel value)
            optim=common.optim(lr=common.pick(arg.variant, shapes=2e-3, tiny=1e-3),
                               warmup_steps=common.pick(arg.variant, shapes=20, tiny=1)),
        ),
        vlm=dict(
            steps=common.pick(arg.variant, shapes=800, tiny=3),
            batch_size=common.pick(arg.variant, shapes=16, tiny=2),
            # Three "<image> scene description" rows for one task prompt alone: reading the image is the slow part.
            description_fraction=0.75,
            # 2e-3 with a cosine decay: at a constant rate 2e-3 read descriptions better than 4e-3, and reading the
            # image comes late and fast, at the end of the decay (docs/shapesworld_log.md: Evidence moved out of
            # the configs).
            optim=common.optim(lr=common.pick(arg.variant, shapes=2e-3, tiny=1e-3),
                               warmup_steps=common.pick(arg.variant, shapes=20, tiny=1)),
        ),
    ))
    config.stage0.vlm.optim.schedule = "cosine"

    # Scored by qk_jax.evaluate on held-out scenes: GenEval-style categories for t2i, success and preservation
    # for edit, identity and placement for custom/multi, both for subject_edit (docs/design.md). Every sample is
    # drawn once per sampler seed; the report gives the mean and the spread over seeds. The untrained baseline
    # (qk_jax.evaluation.scoring.untrained) is scored on the first seed with untrained_samples per task.
    config.evaluate = ml_collections.ConfigDict(dict(
        tasks=("t2i", "edit", "custom", "multi", "subject_edit"),
        samples_per_task=common.pick(arg.variant, shapes=100, tiny=2),
        untrained_samples=common.pick(arg.variant, shapes=50, tiny=2),
        seeds=common.pick(arg.variant, shapes=(0,), tiny=(0,)),
        batch=common.pick(arg.variant, shapes=25, tiny=2),
    ))
    return config
