r"""python -m qk_jax.train --config configs/stage3b.py:shapes --workdir /tmp/qk_stage3b

The resolution upscaling after stage 3 (paper section 3.3, "Training recipe"): the same model, mesh, sharding,
tasks and trainable leaves as stage 3 (``stage3.py``), at twice the resolution (paper: 1024x1024), a smaller
batch and a smaller learning rate, for a short run. Starts from stage 3 (``init_from``).
Drop ``:shapes`` for the paper scale (see launch/); ``:shapes,batch=8`` or ``--config.optim.lr=...`` override.
"""

from configs import common
from configs import stage3


def get_config(arg=None):
    """Stage 3b at the scale named by ``arg`` (see ``common.parse_arg``)."""
    arg = common.parse_arg(arg, **common.STAGE_ARGS)
    config = stage3.get_config(common.variant_arg(arg))  # stage 3's model, mesh, sharding, trainable leaves and tasks
    config.init_from = "/tmp/qk_stage3"  # stage 3's --workdir; override with --config.init_from
    config.resolution = 2 * config.resolution  # paper: 512 -> 1024; data.resolution follows (a reference)
    # Section 3.3: global batch 256, 3,000 more steps, lr 1e-5.
    config.batch_size = common.pick(arg.variant, paper=256, shapes=8, tiny=2)
    config.total_steps = common.pick(arg.variant, paper=3_000, shapes=200, tiny=2)
    config.optim = common.optim(lr=common.pick(arg.variant, paper=1e-5, shapes=5e-5, tiny=1e-3),
                                warmup_steps=common.pick(arg.variant, paper=100, shapes=20, tiny=1))
    return common.override(config, arg)
