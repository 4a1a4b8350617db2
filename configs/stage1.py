r"""python -m qk_jax.train --config configs/stage1.py:shapes --workdir /tmp/qk_stage1

Stage 1 of Query-Kontext (paper section 3.2, table 3): align the VLM to generation through a light diffusion
head. The VLM reads the prompt and the input images and emits its text and kontext-query hidden states; the
connector maps them into a light MMDiT (~870M at paper scale) that renders the target. Images reach the VLM
only: there are no VAE in-context inputs yet.

Trains: the VLM's LoRA, the kontext queries, the connector and the whole light head.
Drop ``:shapes`` for the paper scale (see launch/); ``:shapes,batch=8`` or ``--config.optim.lr=...`` override.
"""

from configs import common


def get_config(arg=None):
    """Stage 1 at the scale named by ``arg`` (see ``common.parse_arg``)."""
    arg = common.parse_arg(arg, **common.STAGE_ARGS)
    config = common.settings(arg.variant)  # shared: resolution, precision, flow, sampling, logging (common.py)
    config.stage = 1

    # The model (paper table 11 at paper scale; each builder's dims per scale are in common.py).
    config.vlm = common.vlm(arg.variant)  # Qwen2.5-VL-7B and its kontext queries
    # Section 3.3: r_m = 128, alpha_m = 256. ShapesWorld: an eighth of the LLM width (the paper's is 1/28; at
    # rank 64 the adapter cost as much as the 128-wide projections it adapts); alpha / rank = 2 as in the paper.
    config.vlm.lora.rank, config.vlm.lora.alpha = common.pick(
        arg.variant, paper=(128, 256), shapes=(16, 32), tiny=(4, 8))
    config.connector = common.connector(arg.variant, arg.flux)
    config.mmdit = common.mmdit(arg.variant, light=True, flux=arg.flux)  # the light head, dropped after this stage
    config.vae = common.vae(arg.variant)  # FLUX.1's autoencoder, frozen
    config.data = common.data(arg.variant, config)  # buckets at config.resolution; ShapesWorld below paper scale

    # Appendix D: the VLM tensor-parallel over 'tensor', the MMDiT (here the light head) ZeRO-2: parameters
    # replicated, optimizer state sharded over 'data' x 'fsdp'.
    config.mesh = common.mesh(arg.variant)
    config.sharding = common.sharding()

    config.trainable = (r"^vlm/.*/lora_[ab]$", r"kontext_queries$", r"^connector/", r"^mmdit/")
    # Table 3: image generation (T2I), reconstruction (I2I) and transformation (TI2I). Relative weights are
    # ours: the paper gives none.
    config.tasks = dict(t2i=0.5, recon=0.25, transform=0.25)

    # Table 3: global batch 512, 72K steps, lr 1e-4. ShapesWorld: a few minutes on 2 CPU cores; the light head is
    # dropped after this stage, so it only has to teach the VLM's adapter, queries and connector to condition.
    config.batch_size = common.pick(arg.variant, paper=512, shapes=32, tiny=2)
    config.total_steps = common.pick(arg.variant, paper=72_000, shapes=250, tiny=2)
    # A few-M-parameter model trained from scratch takes a larger step than a 7B + 870M one.
    config.optim = common.optim(lr=common.pick(arg.variant, paper=1e-4, shapes=1e-3, tiny=1e-3),
                                warmup_steps=common.pick(arg.variant, paper=1_000, shapes=25, tiny=1))
    return common.override(config, arg)
