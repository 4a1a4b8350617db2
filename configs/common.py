"""What the Query-Kontext stage configs share, at three scales.

A stage file (``stage1.py`` ... ``stage3b.py``) assembles its config from the builders here, each call in view:
``settings`` (what the stages share), the model (``vlm``, ``connector``, ``mmdit``, ``vae``), ``data``, ``mesh``
and ``sharding``, then its own rows of paper table 3 (trainable leaves, tasks, batch, steps, optimizer). ``base``
is the same assembly with stage 2's model, for tests and tools that need a whole config of no particular stage.
The variant is the first word of the config argument (``--config configs/stage3.py:shapes``):

- ``paper`` (the default): the paper's sizes and recipe (section 3.3, tables 3 and 11, appendix D).
- ``shapes``: ShapesWorld on 2 CPU cores: 64x64 images, a model of a few million parameters.
- ``tiny``: the tests: the smallest dims that still exercise every code path.

ShapesWorld's model, counted with transformers/diffusers: VLM 1.23M (plus 16 x 128 kontext queries), MMDiT 2.52M
(stage 1's light head 0.36M), VAE 0.25M, connector 33K: 4,045,907 parameters in stage 2 (the trainer's count). Its
recipe is sized for the README's curriculum (stage 0, stages 1-3 and the evaluation) on 2 CPU cores: longer than
issue 9 asked for, because at that length the model followed no prompt (docs/shapesworld_log.md: Sessions one to
seven, "Time"; Eleventh session).

Names that the rest of qk_jax relies on:

- The params pytree has four top-level entries: ``vlm`` (Qwen2.5-VL; the kontext queries are its leaf
  ``.../kontext_queries``), ``connector``, ``mmdit`` (stage 1: the light head; from stage 2 on the large MMDiT
  under the same name) and ``vae`` (always frozen). A leaf is named by its '/'-joined path
  (``mmdit/transformer_blocks_3/attn/to_q/kernel``); LoRA leaves ``lora_a``/``lora_b`` sit beside ``kernel``.
- ``config.trainable`` (set by each stage) and LoRA ``targets`` are regexes, ``re.search``-ed over those paths
  (LoRA: over module paths, without the leaf name).
- ``config.vlm.vision``/``config.vlm.text`` use transformers' ``Qwen2_5_VLConfig`` field names, ``config.mmdit``
  diffusers' ``FluxTransformer2DModel`` ones and ``config.vae`` diffusers' ``AutoencoderKL`` ones, so the reference
  models are built from them directly. Keys of ours beside them: ``VLM_TEXT_EXTRA_KEYS``, ``MMDIT_EXTRA_KEYS``.
- Sequences are tuples, not lists: ml_collections can override a tuple from the command line
  (``--config.trainable='("^connector/",)'``) but not a list.
"""

import ml_collections

VARIANTS = ("paper", "shapes", "tiny")

# The sweepable arguments of every stage file (``stage3.py:shapes,batch=8``); 0 keeps the variant's value.
# ``flux=dev`` or ``flux=schnell`` (every stage of a curriculum alike): the large MMDiT in FLUX.1's layout
# (``FLUX_LAYOUTS``), so that ``config.pretrained.mmdit`` can be a FLUX.1 transformer folder.
STAGE_ARGS = dict(res=0, batch=0, steps=0, flux="")

# FLUX.1's transformer (its diffusers config.json): 19 double- and 38 single-stream blocks, 24 heads x 128,
# context 4096 (T5's width) and pooled 768 (CLIP's); dev also embeds its distilled guidance. The tiny variant keeps
# the same shape of things at test size: pooled width != context width, more single blocks than double.
FLUX_LAYOUTS = dict(
    paper=dict(num_layers=19, num_single_layers=38, num_attention_heads=24, attention_head_dim=128,
               joint_attention_dim=4096, pooled_projection_dim=768, axes_dims_rope=(16, 56, 56)),
    tiny=dict(num_layers=1, num_single_layers=2, num_attention_heads=2, attention_head_dim=16,
              joint_attention_dim=48, pooled_projection_dim=24, axes_dims_rope=(4, 6, 6)),
)
FLUX_MODELS = ("dev", "schnell")

# Transformers derives the LLM's head dim (hidden / heads) and, since v5, nests the rope settings in
# ``rope_parameters``; the released config.json has them flat, as here.
VLM_TEXT_EXTRA_KEYS = ("head_dim", "rope_theta", "mrope_section")
# diffusers hard-codes RoPE theta 1e4 and the FFN ratio 4 in FLUX; LoRA is ours.
MMDIT_EXTRA_KEYS = ("lora", "mlp_ratio", "pos_embed", "rope_theta")

# LoRA on the LLM's attention and MLP projections (transformers names). ``layers_N`` are the LLM's decoder
# layers; the ViT's ``blocks_N`` also have an ``mlp/gate_proj`` and must not match.
VLM_LORA_TARGETS = (
    r"layers_\d+/self_attn/(q_proj|k_proj|v_proj|o_proj)$",
    r"layers_\d+/mlp/(gate_proj|up_proj|down_proj)$",
)
# LoRA on the MMDiT's attention and FFN projections (diffusers FLUX names), both streams. Single-stream
# blocks (none at paper scale) get it on their attention only.
MMDIT_LORA_TARGETS = (
    r"attn/(to_q|to_k|to_v|to_out_0|add_q_proj|add_k_proj|add_v_proj|to_add_out)$",
    r"ff/net_0/proj$",
    r"ff/net_2$",
    r"ff_context/net_0/proj$",
    r"ff_context/net_2$",
)

# ShapesWorld's large MMDiT (stages 2 and 3) draws its training t from a logit-normal with this mean (on top of
# FLUX's shift, mu = 0.47 at 64 tokens) in place of 0: median t 0.81 instead of 0.62. Flat images keep their
# layout and colours up to very high noise, so what the prompt decides is learnt at high t, where mean 0 puts few
# training samples; with mean 1 stage 2 learnt the layout in both seeds tried (docs/shapesworld_log.md: Eighth
# session). Stage 1 keeps 0, so that stages 0-1 are unchanged.
SHAPES_LARGE_FLOW_MEAN = 1.0

# Appendix D's aspect-ratio buckets as (w, h): 1:1, 1:2, 2:3, 3:4, 3:5, 4:5, 9:16 and their transposes.
# 1:1 is its own transpose, so there are 13 buckets.
ASPECT_RATIOS = ((1, 1), (1, 2), (2, 1), (2, 3), (3, 2), (3, 4), (4, 3), (3, 5), (5, 3), (4, 5), (5, 4),
                 (9, 16), (16, 9))

# ShapesWorld's words (``qk_jax.data.shapesworld.prompt_words``, ``<image k>`` aside) and the world's texture names: the
# vocabulary of the word-level tokenizer (``qk_jax.data.processors.WordProcessor``). Word i is token i + 1 (0 is the
# unknown word), so a checkpoint is tied to this order: append new words, never reorder.
SHAPES_VOCABULARY = (
    ",", "a", "add", "and", "at", "blue", "bottom", "center", "circle", "colors", "down", "everything", "from",
    "green", "image", "in", "large", "left", "make", "mirror", "move", "of", "orange", "purple", "put", "red",
    "redraw", "remove", "replace", "right", "small", "square", "subject", "swap", "the", "top", "triangle", "up",
    "with", "yellow", "checker", "stripes",
)

# Logical axis names of the parameters (``nn.with_logical_partitioning``); the activations' are in ``sharding``.
PARAM_AXES = ("embed", "heads", "kv_heads", "head_dim", "mlp", "vocab", "lora_rank", "norm", "conv_in", "conv_out",
              "layers")
# Appendix D: tensor parallelism on the VLM: attention heads, MLP hidden units and the vocabulary are split
# Megatron-style over 'tensor'; everything else is replicated.
VLM_TENSOR_AXES = ("heads", "kv_heads", "mlp", "vocab")


def parse_arg(arg, *, variants=VARIANTS, **defaults):
    """Parses a big_vision-style config argument: ``'shapes,batch=8'`` -> ``{variant: 'shapes', batch: 8, ...}``.

    The one bare word is the variant (absent: ``variants[0]``); ``key=value`` pairs set the keys of ``defaults``,
    typed by their default's type. An unknown variant or key raises ValueError naming it and the valid ones.
    """
    parsed = ml_collections.ConfigDict(dict(variant=variants[0], **defaults))
    variant_given = False
    for word in (w.strip() for w in (arg or "").split(",")):
        if not word:
            continue
        key, has_value, value = word.partition("=")
        key = key.strip()
        if not has_value:
            if word not in variants:
                raise ValueError(f"unknown variant {word!r} in config argument {arg!r}; valid: {', '.join(variants)}")
            if variant_given:
                raise ValueError(f"config argument {arg!r} names two variants; give one of {', '.join(variants)}")
            parsed.variant, variant_given = word, True
        elif key not in defaults:
            valid = ", ".join(sorted(defaults)) or "none"
            raise ValueError(f"unknown key {key!r} in config argument {arg!r}; valid keys: {valid}")
        else:
            parsed[key] = _typed(key, value.strip(), defaults[key])
    return parsed


def _typed(key, value, default):
    """``value`` (a string) as the type of ``default``."""
    kind = type(default)
    if kind is bool:
        if value.lower() not in ("true", "false", "1", "0"):
            raise ValueError(f"config argument {key}={value!r}: expected true or false")
        return value.lower() in ("true", "1")
    try:
        return kind(value)
    except ValueError:
        raise ValueError(f"config argument {key}={value!r}: expected {kind.__name__}") from None


def pick(variant, **values):
    """The value for ``variant``: ``pick(v, paper=512, shapes=16, tiny=2)``."""
    if variant not in values:
        raise ValueError(f"no value for variant {variant!r}; this setting has {', '.join(values)}")
    return values[variant]


def override(config, arg):
    """Applies the ``STAGE_ARGS`` given in ``arg`` (non-zero) to a stage config; returns it."""
    if arg.res:
        config.resolution = arg.res  # a reference: data.resolution (and ShapesWorld's canvas) follow
    if arg.batch:
        config.batch_size = arg.batch
    if arg.steps:
        config.total_steps = arg.steps
    return config


def variant_arg(arg):
    """``arg``'s variant and ``flux`` as a config argument, for a stage file built on another's (stage 3b)."""
    return f"{arg.variant},flux={arg.flux}" if arg.flux else arg.variant


def base(variant):
    """A whole config of no particular stage: ``settings``, stage 2's model, ``data``, ``mesh`` and ``sharding``.

    For tests and tools that need a complete config. The stage files assemble theirs from the same builders, in
    view, and add ``stage``, ``trainable``, ``tasks``, ``batch_size``, ``total_steps`` and ``optim``
    (``tests/test_configs.py`` checks that stage 2 is this plus those).
    """
    config = settings(variant)
    config.vlm = vlm(variant)
    config.connector = connector(variant)
    config.mmdit = mmdit(variant)
    config.vae = vae(variant)
    config.data = data(variant, config)
    config.mesh = mesh(variant)
    config.sharding = sharding()
    return config


def settings(variant):
    """What every stage starts from: image size and references, ablation switches, precision, flow matching,
    sampling, seed, logging, checkpointing and imported weights. A stage file sets the rest in view (see the module
    docstring) and changes a few of these, in view too (stage 3's ``in_context`` and ``source_offset``, stage 3b's
    ``resolution``, ShapesWorld's ``flow.mean`` in stages 2 and 3).
    """
    config = ml_collections.ConfigDict()
    # One value, several readers: the trainer, the bucketer (data.resolution) and ShapesWorld's canvas.
    config.resolution = ml_collections.FieldReference(pick(variant, paper=512, shapes=64, tiny=32))
    # Section 3.3: N = 2 reference images at most (the reference bucketer and sRoPE's n = 1..N).
    config.max_references = ml_collections.FieldReference(2)
    config.init_from = ml_collections.config_dict.placeholder(str)  # a previous stage's workdir
    config.in_context = False  # VAE latents of source/reference images in the MMDiT's image stream (stage 3)
    # Ablations. Table 9: what conditions the MMDiT: 'text_and_queries' (the paper's model), 'text_only',
    # 'queries_only'. Table 8: where in-context images sit in sRoPE: 'task' (sources negative, references
    # shifted, as each task says), 'reference' or 'source' (every input image placed that way).
    config.conditioning = "text_and_queries"
    config.placement = "task"
    # Where a source image sits in sRoPE: 'negate' (the paper's eq. 2/4, (0, -r, -c)) or 'axis0' (FLUX.1
    # Kontext's (1, r, c)); an editing ablation.
    config.source_offset = "negate"
    # The guidance-embedding input of an MMDiT that has one (``flux=dev``), held at this value in training and
    # sampling; real classifier-free guidance does the guiding (``QueryKontextConfig.distilled_guidance``).
    config.distilled_guidance = 1.0

    # Appendix D: bf16 mixed precision (float32 params, bf16 compute). The CPU scales stay in float32.
    config.compute_dtype = pick(variant, paper="bfloat16", shapes="float32", tiny="float32")
    # Opt-in deviation from it: the MMDiT blocks' projections in float8 (``qk_jax.ops.fp8``; docs/performance.md).
    config.fp8 = False
    # What each MMDiT block keeps for the backward pass (``qk_jax.models.mmdit.REMAT_POLICIES``): "none" keeps
    # everything; "full" recomputes each block. ``python -m qk_jax.plan`` shows what each choice costs.
    config.remat = pick(variant, paper="full", shapes="none", tiny="none")
    # Each MMDiT block stack as one scanned block: compile time independent of depth; params layer-stacked
    # (``qk_jax.models.mmdit.stack_layers``; checkpoints of either layout load, the converters write per layer).
    config.scan_layers = False
    # DiT's adaLN-Zero init for an MMDiT trained from scratch (ShapesWorld's; ``qk_jax.models.mmdit.MMDiT``). The
    # paper's MMDiT starts pretrained. Off at test scale, where random gates exercise every path.
    config.adaln_zero = pick(variant, paper=False, shapes=True, tiny=False)
    config.ema_decay = ml_collections.config_dict.placeholder(float)  # the paper mentions no EMA
    # Classifier-free guidance needs the model to see missing conditions. The paper gives no rates: 0.1 each,
    # drawn independently, so 0.01 of the samples lose both (the unconditional branch).
    config.cfg_dropout = ml_collections.ConfigDict(dict(text=0.1, image=0.1))
    # FLUX's flow matching (docs/design.md): logit-normal t (mean, std), shifted by mu linear in the number of image
    # tokens (256 tokens -> 0.5, 4096 -> 1.15; a 512x512 image has 1024 tokens).
    config.flow = ml_collections.ConfigDict(dict(
        mean=0.0, std=1.0, base_seq_len=256, max_seq_len=4096, base_shift=0.5, max_shift=1.15))
    # Euler sampling with three-branch guidance; FLUX-dev-like step count, guidance scales our choice. Flat
    # ShapesWorld images need fewer steps, and its evaluation samples thousands of them on CPU. ShapesWorld's
    # image guidance is 3: on the stage-3 models measured it scored at least as well as 1.5 on every task and
    # kept sources and subjects better; 5 lost the subject to the source (docs/shapesworld_log.md: Fourteenth
    # session; Thirteenth session, "Image guidance").
    config.sample = ml_collections.ConfigDict(dict(
        steps=pick(variant, paper=28, shapes=16, tiny=28), cfg_text=4.0,
        cfg_image=pick(variant, paper=1.5, shapes=3.0, tiny=1.5), negative_prompt=""))
    # Samples while training (``qk_jax.training.previews``): every ``every`` steps and at a stage's end, one
    # held-out input per task of the stage, ``steps`` Euler steps (0: the sample block's), to <workdir>/samples/
    # and TensorBoard; every=0 is off. ``manifest``: where the inputs come from (default: the training data's).
    config.preview = ml_collections.ConfigDict(dict(
        every=pick(variant, paper=5000, shapes=1000, tiny=0), steps=pick(variant, paper=0, shapes=12, tiny=2),
        seed=0, manifest=ml_collections.config_dict.placeholder(str)))
    # A jax.profiler trace of some steps into <workdir>/profile: (first step, how many); () is off.
    config.profile_steps = ()
    config.wandb = wandb_block()

    # The run: seed (params, data order, noise), how often to print/log and to checkpoint, how many to keep.
    config.seed = 0
    config.log_every = pick(variant, paper=50, shapes=25, tiny=1)
    config.checkpoint_every = pick(variant, paper=1000, shapes=250, tiny=2)
    config.keep_checkpoints = 3
    # Before anything is built, the planner's per-device estimate against the accelerator's memory: a stage that
    # cannot fit stops with the figures (``qk_jax.training.loop.check_memory``); False tries anyway.
    config.memory_check = True
    # Imported weights (``qk_jax.convert``): stage 1 starts the VLM from Qwen2.5-VL-7B and the VAE from FLUX.1's;
    # stage 2 may start the MMDiT from a FLUX-layout checkpoint. Folders of transformers/diffusers safetensors.
    config.pretrained = ml_collections.ConfigDict(dict(
        vlm=ml_collections.config_dict.placeholder(str), vae=ml_collections.config_dict.placeholder(str),
        mmdit=ml_collections.config_dict.placeholder(str)))
    return config


def data(variant, config):
    """``config.data``: the buckets (at ``config.resolution``, a reference), the records and their loading.

    ``config`` must have ``resolution``, ``max_references`` and ``vae`` already: ``data.resolution`` and
    ``data.max_references`` follow the config's (``--config.resolution=...`` moves both), and bucket sides are
    multiples of the VAE's downsampling.
    """
    block = ml_collections.ConfigDict()
    block.resolution = config.get_ref("resolution")  # the bucket area is resolution**2
    block.aspect_ratios = ASPECT_RATIOS
    # Bucket sides are multiples of the VAE's downsampling times the 2x2 latent packing (paper: 8 * 2 = 16).
    block.side_multiple = 2 * 2 ** (len(config.vae.block_out_channels) - 1)
    block.max_references = config.get_ref("max_references")
    if variant != "paper":
        block.world = shapesworld_block()
    # Grain worker processes drawing/decoding and batching (0: in the trainer's process, right for 2 CPU cores).
    # On a GPU host one drawing process cannot keep up with the shapes step, so give it 8-12
    # (docs/shapesworld_log.md: Evidence moved out of the configs). The batch order depends on the count: resume
    # with the same one.
    block.workers = 0
    # Multi-process: each process reads its own records (False), or every process reads the whole global stream and
    # feeds its rows (True: the same batches whatever the process count, at that many times the reading). Unset:
    # True for a manifest (its aspect ratios and bad records would bucket each process's records its own way, and
    # the processes must feed one batch shape), False for drawn ShapesWorld (one size, no bad records).
    block.global_stream = ml_collections.config_dict.placeholder(bool)
    # With the global stream: every process buckets it from the images' headers and decodes only its own rows
    # (unset or True; a row that fails to decode is fed masked), or decodes all of it and keeps its rows (False).
    # True also plans on one process: the batches of any multi-process run (qk_jax.data.pipeline.reading_mode).
    block.decode_own_rows = ml_collections.config_dict.placeholder(bool)
    # A JSONL manifest (``qk_jax.data.manifest``). Unset on the ShapesWorld configs: the trainer draws
    # ``data.num_samples`` ShapesWorld records as it reads them (``shapesworld.ShapesManifest``), or writes them
    # once into ``data.dir`` when that is set. Fresh scenes matter: the MMDiT memorised the layouts of a written
    # set instead of reading the prompt (docs/shapesworld_log.md: How the stage-2 recipe was found).
    block.manifest = ml_collections.config_dict.placeholder(str)
    block.dir = ml_collections.config_dict.placeholder(str)
    block.num_samples = pick(variant, paper=0, shapes=1_000_000, tiny=64)
    # ``pipeline.trim_text``: cut each batch's shared text padding to a multiple of this (0: keep max_text_tokens).
    # ShapesWorld prompts fill a third of max_text_tokens and the MMDiT's text stream computes every position, so
    # trimming makes a shapes step faster (docs/shapesworld_log.md: Evidence moved out of the configs).
    # Single-process only (each host would trim its own way).
    block.text_multiple = pick(variant, paper=0, shapes=16, tiny=0)
    return block


def vlm(variant):
    """Qwen2.5-VL-7B (paper table 11; the released config.json) plus the kontext queries. LoRA off."""
    vision = dict(in_channels=3, hidden_act="silu", temporal_patch_size=2, spatial_merge_size=2,
                  tokens_per_second=2)
    vision.update(pick(
        variant,
        # Table 11 says MLP 3456; the released weights have 3420. window_size is in pixels (4x4 merged tokens).
        paper=dict(depth=32, hidden_size=1280, num_heads=16, intermediate_size=3420, patch_size=14,
                   window_size=112, fullatt_block_indexes=(7, 15, 23, 31), out_hidden_size=3584),
        # 64 px / patch 8 = 8x8 patches -> 4x4 merged tokens per image; 32 px windows hold 2x2 of them.
        shapes=dict(depth=4, hidden_size=64, num_heads=4, intermediate_size=160, patch_size=8,
                    window_size=32, fullatt_block_indexes=(1, 3), out_hidden_size=128),
        # 32 px / 8 = 4x4 patches -> 2x2 merged tokens; 16 px windows hold one: layer 0 windowed, layer 1 full.
        tiny=dict(depth=2, hidden_size=32, num_heads=2, intermediate_size=64, patch_size=8,
                  window_size=16, fullatt_block_indexes=(1,), out_hidden_size=32),
    ))
    text = dict(hidden_act="silu", rms_norm_eps=1e-6, rope_theta=1e6, max_position_embeddings=128000,
                tie_word_embeddings=False)
    text.update(pick(
        variant,
        # 28 query / 4 KV heads x 128 (GQA); M-RoPE splits the 64 rotary frequencies (t, h, w) = (16, 24, 24).
        paper=dict(hidden_size=3584, num_hidden_layers=28, num_attention_heads=28, num_key_value_heads=4,
                   head_dim=128, intermediate_size=18944, vocab_size=152064, mrope_section=(16, 24, 24)),
        # ShapesWorld's word-level tokenizer: 42 words and the unknown word, Qwen's special tokens at 480+.
        shapes=dict(hidden_size=128, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                    head_dim=32, intermediate_size=384, vocab_size=512, mrope_section=(4, 6, 6)),
        tiny=dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                  head_dim=16, intermediate_size=64, vocab_size=128, mrope_section=(2, 3, 3)),
    ))
    # Qwen's special tokens keep their offsets from the first one (151643 in the released vocabulary); the
    # small vocabularies put them at the end of the table.
    first_special = pick(variant, paper=151643, shapes=480, tiny=96)
    text.update(bos_token_id=first_special, eos_token_id=first_special + 2)
    config = ml_collections.ConfigDict(dict(
        vision=vision, text=text,
        vision_start_token_id=first_special + 9, vision_end_token_id=first_special + 10,
        image_token_id=first_special + 12, video_token_id=first_special + 13))
    # K, section 3.3. ShapesWorld keeps the paper's 1:4 of queries to text tokens (16 : 64).
    config.num_queries = pick(variant, paper=128, shapes=16, tiny=4)
    # The LLM is causal; queries appended after the prompt keep that mask ('bidirectional' among the queries
    # is the alternative). The paper does not say.
    config.query_attention = "causal"
    # What prompts are tokenised with (``qk_jax.data.processors.processor_for``), in training, sampling and
    # evaluation alike: a local folder with Qwen2.5-VL's tokenizer; unset (the paper), the one the model came with
    # (init_from's final/tokenizer, else config.pretrained.vlm's), and an error if neither has one; or a stand-in
    # for a model trained from scratch: 'word' (ShapesWorld's closed vocabulary) or 'byte' (one per UTF-8 byte).
    config.tokenizer = pick(variant, paper=ml_collections.config_dict.placeholder(str), shapes="word", tiny="byte")
    if variant != "paper":
        config.vocabulary = SHAPES_VOCABULARY
    # Table 9: "Text (512) & query (128)". ShapesWorld's longest prompt is 25 words with two images, each 18
    # tokens at 64 px (16 merged patches and the vision start/end tokens): 61. The tests read bytes: up to 145
    # for a ShapesWorld prompt, plus 6 tokens per 32-px image.
    config.max_text_tokens = pick(variant, paper=512, shapes=64, tiny=192)
    config.frozen_dtype = pick(variant, paper="bfloat16", shapes="float32", tiny="float32")
    config.lora = ml_collections.ConfigDict(dict(rank=0, alpha=0, targets=VLM_LORA_TARGETS))
    return config


def flux_layout(variant, flux):
    """The ``FLUX_LAYOUTS`` entry of ``flux`` (``'dev'``/``'schnell'``) at this scale, or None for ``''``."""
    if not flux:
        return None
    if flux not in FLUX_MODELS:
        raise ValueError(f"flux={flux!r}; expected one of {', '.join(FLUX_MODELS)} (or leave it out)")
    if variant not in FLUX_LAYOUTS:
        raise ValueError(f"flux={flux} has no {variant!r} layout; FLUX layouts exist for {', '.join(FLUX_LAYOUTS)}")
    return dict(FLUX_LAYOUTS[variant], guidance_embeds=flux == "dev")


def connector(variant, flux=""):
    """Two-layer MLP from the VLM's hidden states to the MMDiT's text stream (appendix D).

    Paper: 3584 -> 960 -> 2560 with biases = 3,441,600 + 2,460,160 = 5,901,760 parameters, table 11's 5.9M.
    The output width is the MMDiT's context width (``joint_attention_dim``) for both the light and the large
    head, so the connector carries over from stage 1 to stage 2. With ``flux`` its output is FLUX.1's context
    width and its ``pooled_proj`` maps the pooled mean to FLUX.1's pooled width (``qk_jax.models.connector``).
    """
    dims = pick(variant, paper=(3584, 960, 2560), shapes=(128, 128, 128), tiny=(32, 16, 32))
    config = ml_collections.ConfigDict(dict(
        in_features=dims[0], hidden_features=dims[1], out_features=dims[2], act="gelu",
        pooled_features=ml_collections.config_dict.placeholder(int)))
    layout = flux_layout(variant, flux)
    if layout:
        config.update(out_features=layout["joint_attention_dim"], pooled_features=layout["pooled_projection_dim"])
    return config


def mmdit(variant, *, light=False, flux=""):
    """A FLUX-layout MMDiT (diffusers field names): the large model, or stage 1's light head of the same family.

    Counted with diffusers on the meta device (tests/test_configs.py):
    - paper, large: 42 double-stream layers, 40 heads x 64 = 2560 wide: 9,952,604,736 parameters (~10B).
    - paper, light: 10 layers, 24 heads x 64 = 1536 wide: 867,713,600 (section 3.3: ~870M).
    - ``flux='dev'``/``'schnell'``: the large model is FLUX.1's transformer (``FLUX_LAYOUTS``; 11.9B), the light
      head keeps its dims and takes FLUX.1's context and pooled widths from the connector.
    """
    config = ml_collections.ConfigDict(dict(
        # The VAE latents are packed 2x2 into tokens, FLUX's "patch 2" (table 11): the transformer's own patch is 1.
        patch_size=1, in_channels=4 * vae(variant).latent_channels, out_channels=None,
        guidance_embeds=False,  # no distilled guidance: the model is trained with real CFG dropout
        rope_theta=10000, mlp_ratio=4.0, pos_embed="none"))
    if variant == "shapes" and not light:
        # ShapesWorld's large MMDiT starts from random weights (the paper's is a pretrained FLUX-like model) and
        # must learn the layout within stage 2: SD3's absolute sin-cos embedding of each image token's (row, col),
        # on top of sRoPE, tells every token its cell from the first step. Both seeds tried placed objects better
        # with it: a modest gain, not a fix (docs/shapesworld_log.md: Sessions one to seven, "SD3's sin-cos
        # position embedding"). diffusers' FluxTransformer2DModel has no such embedding: the export records it for
        # the user to add (``qk_jax.convert.export``).
        config.pos_embed = "sincos"
    layers, single_layers, heads, head_dim = pick(
        variant,
        paper=(10, 0, 24, 64) if light else (42, 0, 40, 64),
        shapes=(2, 0, 2, 32) if light else (4, 0, 4, 32),
        # The tiny large model has one single-stream block, a path of the code the paper's config leaves unused.
        tiny=(1, 0, 2, 16) if light else (2, 1, 2, 16),
    )
    config.update(num_layers=layers, num_single_layers=single_layers, num_attention_heads=heads,
                  attention_head_dim=head_dim)
    # sRoPE's (axis0, row, col) rotary axes sum to the head dim, row and col with equal shares.
    config.axes_dims_rope = pick(variant, paper=(16, 24, 24), shapes=(8, 12, 12), tiny=(4, 6, 6))
    # The connector's output is the text stream (context) and, mean-pooled over the queries, the pooled vector.
    conn = connector(variant, flux)
    config.update(joint_attention_dim=conn.out_features,
                  pooled_projection_dim=conn.pooled_features or conn.out_features)
    layout = flux_layout(variant, flux)
    if layout and not light:
        config.update(layout)
    config.lora = ml_collections.ConfigDict(dict(rank=0, alpha=0, targets=MMDIT_LORA_TARGETS))
    return config


def vae(variant):
    """The FLUX.1 autoencoder (diffusers AutoencoderKL names), frozen in every stage.

    Paper (table 11): 16 latent channels, 8x down; encoder 34,274,208 and decoder 49,545,475 parameters. The
    small variants keep its layout with fewer blocks: diffusers downsamples len(block_out_channels) - 1 times.
    No pretrained autoencoder exists at their sizes: one must be trained on ShapesWorld before stage 1.
    """
    config = ml_collections.ConfigDict(dict(
        in_channels=3, out_channels=3, act_fn="silu", use_quant_conv=False, use_post_quant_conv=False,
        mid_block_add_attention=True))
    blocks, layers, latent, groups = pick(
        variant,
        paper=((128, 256, 512, 512), 2, 16, 32),
        # 4x down: a 64 px image is a 16x16 latent, 8x8 tokens after packing; 8x would leave 4x4 tokens for a
        # 3x3 grid of objects. Narrow: flat shapes need little, and the frozen encoder runs on every target and
        # in-context image of every step (docs/shapesworld_log.md: Evidence moved out of the configs).
        shapes=((16, 32, 32), 1, 16, 8),
        tiny=((8, 16), 1, 4, 4),
    )
    config.update(block_out_channels=blocks, layers_per_block=layers, latent_channels=latent,
                  norm_num_groups=groups, down_block_types=("DownEncoderBlock2D",) * len(blocks),
                  up_block_types=("UpDecoderBlock2D",) * len(blocks))
    # FLUX.1's latent normalisation: z = (latent - shift) * scale. A ShapesWorld VAE measures its own.
    config.update(scaling_factor=0.3611, shift_factor=0.1159)
    return config


def wandb_block() -> ml_collections.ConfigDict:
    """Weights & Biases (``pip install wandb``; off by default): the scalars and preview images the stage writes to
    TensorBoard, one W&B run per stage (``qk_jax.training.metrics.WandbLogger``). ``mode``: W&B's (``online``,
    ``offline``, ``disabled``; unset: its environment's ``WANDB_MODE``, else online)."""
    placeholder = ml_collections.config_dict.placeholder
    return ml_collections.ConfigDict(dict(enabled=False, project="qk_jax", entity=placeholder(str),
                                          group=placeholder(str), mode=placeholder(str)))


def shapesworld_block():
    """ShapesWorld (docs/design.md): 1-3 flat shapes on a white canvas of ``config.data.resolution`` pixels.

    Colors are far apart in RGB so that the evaluator can segment them; sizes are the object's side as a
    fraction of a grid cell (a third of the canvas).
    """
    return ml_collections.ConfigDict(dict(
        background=(255, 255, 255),
        min_objects=1, max_objects=3,
        shapes=("circle", "square", "triangle"),
        colors=dict(red=(220, 30, 30), green=(30, 160, 50), blue=(30, 70, 220), yellow=(240, 210, 20),
                    purple=(140, 50, 170), orange=(245, 130, 20)),
        sizes=dict(small=0.5, large=0.9),
        grid=3,  # 3x3 positions, "top left" ... "bottom right"
        textures=("stripes", "checker"),  # the two-color "subjects" of the custom/multi/subject_edit tasks
    ))


def mesh(variant):
    """The device mesh as big_vision ``(axis, size)`` pairs; -1 takes the remaining devices.

    Deviation: appendix D puts tensor parallelism on the VLM; the default here has none at every scale. In our
    step a 'tensor' axis repeats the MMDiT's work on each of its devices, and the 7B VLM fits without it: on 192
    x 80 GB the planner fits every paper stage at 64 x 3 x 1 (stage 2: 68 GB, 2.0 s per step), while at
    48 x 1 x 4 stage 2 needs 164 GB per device and a device does 22 samples' MMDiT work instead of 6
    (``python -m qk_jax.plan``). ``('tensor', 4)``, the largest that divides the LLM's 4 KV heads, splits the VLM
    as the paper does. A device count with a factor 3 (192 = 64 x 3) needs ``('fsdp', 3)``: ZeRO splits a leaf
    only over axes that divide its dims.
    """
    del variant
    return (("data", -1), ("fsdp", 1), ("tensor", 1))


def sharding():
    """Logical-axis rules per component (logical name -> mesh axis or None), the same at every scale.

    VLM: tensor parallelism over 'tensor' when the mesh has one. MMDiT: ZeRO-2 (appendix D): float32 masters,
    gradients and optimizer state split over the data axes, the compute copy gathered once per step
    (``qk_jax.parallel.zero``). The connector and the VAE are small and follow the MMDiT's rules.
    """
    return ml_collections.ConfigDict(dict(
        # Parameters (``qk_jax.training.loop`` and ``qk_jax.parallel.planner``): 'vlm' by vlm_rules, every other
        # component by mmdit_rules.
        vlm_rules=tuple((name, "tensor" if name in VLM_TENSOR_AXES else None) for name in PARAM_AXES),
        mmdit_rules=tuple((name, None) for name in PARAM_AXES),
        # 2: ZeRO-2 for every trainable leaf outside the VLM (masters and gradients split); 1: their masters whole
        # on every device and gradients all-reduced (the optimizer state split either way).
        mmdit_zero_stage=2,
        # The MMDiT's rows also split over 'tensor' (models.query_kontext.QueryKontext.loss): the VLM is tensor-
        # parallel there, the MMDiT data-parallel, so a tensor group does not repeat the MMDiT's work.
        mmdit_rows_over=("tensor",),
        opt_state_axes=("data", "fsdp"),  # the data-parallel (ZeRO) axes (``qk_jax.training.loop.zero_axes``)
    ))


def optim(lr, warmup_steps):
    """AdamW with a linear warmup to a constant ``lr``.

    The paper gives only the learning rate (table 3); the rest are the usual diffusion-transformer settings.
    """
    return ml_collections.ConfigDict(dict(
        name="adamw", lr=lr, schedule="constant", warmup_steps=warmup_steps,
        decay_fraction=0.2,  # schedule 'wsd': the last share of the steps, decaying linearly to 0
        b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.01, grad_clip_norm=1.0,
        grad_accum_steps=1,
        # (path regex, multiplier) pairs, first match wins, others 1: a learning rate per parameter group.
        lr_multipliers=(),
        max_nonfinite=10))  # updates in a row skipped for NaN/inf gradients before the run stops
