r"""python -m qk_jax.train --config configs/stage3.py:shapes --workdir /tmp/qk_stage3

Stage 3 of Query-Kontext (paper section 3.2, table 3): multi-task fine-tuning with VAE in-context inputs.
Source and reference images now also enter the MMDiT's image stream as VAE latents, told apart by sRoPE
(source: negative quadrant, pixel fidelity; reference n: shifted by n latent sizes, identity; ``:shapes``: the
source at FLUX.1 Kontext's (1, r, c), see below), for
editing, customization, multi-subject composition and text-to-image.

Starts from stage 2 (``init_from``); the VLM is frozen; the MMDiT gains a LoRA (r 256, alpha 256).
Trains: the MMDiT's LoRA, the kontext queries and the connector (``:shapes``: the whole MMDiT and the VLM too,
no LoRA; see below).
Drop ``:shapes`` for the paper scale (see launch/); ``:shapes,batch=8`` or ``--config.optim.lr=...`` override.
"""

from configs import common


def get_config(arg=None):
    """Stage 3 at the scale named by ``arg`` (see ``common.parse_arg``)."""
    arg = common.parse_arg(arg, **common.STAGE_ARGS)
    config = common.base(arg.variant)
    config.stage = 3
    config.init_from = "/tmp/qk_stage2"  # stage 2's --workdir; override with --config.init_from
    config.in_context = True
    # ShapesWorld deviates from eq. 2/4 here: the source sits at FLUX.1 Kontext's (1, r, c), not the paper's
    # (0, -r, -c). Under RoPE the paper's choice makes the offset between a target token and the source token of the
    # same pixel depend on the position; a 4-layer MMDiT did not learn to copy across it. Measured with
    # ``python -m qk_jax.ablate --which source_offset --steps 400 --num 50`` from the README curriculum's stage 2
    # (editing alone, LoRA): preservation L1 0.094 negated vs 0.043 at (1, r, c), success 0% vs 2%. (Training the
    # whole MMDiT instead of its LoRA, (1, r, c), 400 steps: 0.051 and 2%; training the VLM as well as the LoRA:
    # 0.038 and 2%.)
    # In the README curriculum (2026-11-27, stages 0-2 of the 57-minute run, 1,000 stage-3 steps): edit
    # preservation 0.089 -> 0.037, subject_edit preservation 0.130 -> 0.085; edit success stays 0%.
    # The tiny variant keeps eq. 2/4, whose token stream the tests check against DESIGN.md.
    config.source_offset = common.pick(arg.variant, paper="negate", shapes="axis0", tiny="negate")
    # Section 3.3: r_d = 256, alpha_d = 256. ShapesWorld: no LoRA (below); tiny: r 4.
    config.mmdit.lora.rank, config.mmdit.lora.alpha = common.pick(
        arg.variant, paper=(256, 256), shapes=(0, 0), tiny=(4, 4))
    config.trainable = (r"^mmdit/.*/lora_[ab]$", r"kontext_queries$", r"^connector/")
    # Table 3: instruction editing, customized generation, multi-subject (TI2I) and T2I; subject_edit (a source
    # and a reference subject together) is MIGE's task, in DESIGN.md. Relative weights are ours.
    config.tasks = dict(edit=0.3, custom=0.2, multi=0.2, subject_edit=0.15, t2i=0.15)
    if arg.variant == "shapes":
        # ShapesWorld deviates from table 3 here: no LoRA; the whole MMDiT and the VLM train, and editing gets the
        # largest share. With a LoRA (r 32 of a 128-wide MMDiT) and the VLM frozen, no edit succeeded in four
        # runs (1,000 steps of the curriculum, 400 edit-only steps with or without the VLM or with the whole
        # MMDiT): the model copies the source and redraws the named object unchanged, i.e. the instruction's
        # verb is not read. From a 3,500-step stage 2, 1,000 steps of t2i + edit (50/50) with the MMDiT and the
        # VLM training reached edit success 10% and preservation 0.024 (50 held-out edits), t2i position 66%,
        # colours 10%; 500 steps of this mix (edit 40%): 0% and 0.028.
        # The VLM trains at the full rate here, unlike stage 2 (its lr_multipliers): from one stage 2, a tenth of
        # the rate in this stage too gave t2i position 40% against 28%, but edit preservation 0.043 against 0.039,
        # subject_edit 0.070 against 0.052, and edit success 1% either way (docs/shapesworld_log.md).
        config.trainable = (r"kontext_queries$", r"^connector/", r"^mmdit/", r"^vlm/")
        config.tasks = dict(edit=0.6, t2i=0.15, custom=0.1, subject_edit=0.1, multi=0.05)
        # Editing is limited by its steps: the model learns to copy kept pixels from the source slowly
        # (``python -m qk_jax.diagnose``). Edit-only from the curriculum's stage 2 at 1e-3: success 0% / 6% / 28%
        # after 500 / 1,000 / 1,500 steps. From the same stage 2, 100 held-out samples per task: 1,000 steps of
        # edit 0.45, t2i 0.25, custom / multi / subject_edit 0.1 (the default before) gave edit success 9%,
        # t2i overall 31%; these 1,500 steps 23% and 31% (seed 1: 7% and 26% before, 21% and 24% now); the same
        # 1,500 after a 2,500-step stage 2, 20% and 20% (docs/shapesworld_log.md, eleventh session).
        config.flow.mean = common.SHAPES_LARGE_FLOW_MEAN  # more training at high noise (common.py)

    # Table 3: global batch 512, 30K steps, lr 2e-5. ShapesWorld: its new tasks are learnt here from scratch, at
    # stage 2's rate; 1,500 steps, ~27 minutes on 2 cores (an in-context step costs ~2.3 stage-2 steps).
    config.batch_size = common.pick(arg.variant, paper=512, shapes=32, tiny=2)
    config.total_steps = common.pick(arg.variant, paper=30_000, shapes=1_500, tiny=2)
    config.optim = common.optim(lr=common.pick(arg.variant, paper=2e-5, shapes=1e-3, tiny=1e-3),
                                warmup_steps=common.pick(arg.variant, paper=500, shapes=30, tiny=1))
    if arg.variant == "shapes":
        # Warmup-stable-decay, as stage 2: the rate falls linearly to 0 over the last 20% of the steps. From the
        # eighth session's 3,500-step constant-rate stage 2, 100 held-out samples per task, 1,000 steps: constant
        # 1e-3 t2i overall 22%, edit success 8% (preservation 0.016), custom identity 8%, subject_edit 6% (0.023);
        # this schedule 30%, 16% (0.016), 10%, 9% (0.015). What helps is the annealing, not a lower rate: a
        # constant 3e-4 gave 25% and 7%; the constant-1e-3 run continued 250 steps at 3e-4, 39% and 23%.
        # From the annealed stage 2 (t2i overall 48%) 1,000 steps of it ended at 31% and edit success 9%.
        config.optim.schedule = "wsd"
    return common.override(config, arg)
