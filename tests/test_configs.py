"""The experiment configs: every file and variant loads, the paper numbers are the paper's, the trainable
regexes pick the right leaves, and the reference implementations (transformers, diffusers; meta device, nothing
allocated) built from the configs have the parameter counts of docs/design.md."""

import importlib.util
import inspect
import pathlib
import re

import ml_collections
import pytest

from configs import common
from configs import shapes
from configs import stage1
from configs import stage2
from configs import stage3
from configs import stage3b
from qk_jax.pytree import match_any

REPO = pathlib.Path(__file__).resolve().parents[1]
STAGES = {"stage1": stage1, "stage2": stage2, "stage3": stage3, "stage3b": stage3b}
STAGE_CONFIGS = [(name, variant) for name in STAGES for variant in common.VARIANTS]


def _config(name, arg=None):
    return STAGES[name].get_config(arg)


# Reference constructors. Our configs use their field names; these map the few keys that differ.


def _qwen_vl(vlm):
    """transformers ``Qwen2_5_VLForConditionalGeneration`` on the meta device, from ``config.vlm``."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    text = vlm.text.to_dict()
    extra = {key: text.pop(key) for key in common.VLM_TEXT_EXTRA_KEYS}
    assert extra["head_dim"] * text["num_attention_heads"] == text["hidden_size"]  # transformers derives it
    text["rope_parameters"] = dict(rope_type="default", rope_theta=extra["rope_theta"],
                                   mrope_section=list(extra["mrope_section"]))
    token_ids = {k: vlm[k] for k in ("image_token_id", "video_token_id", "vision_start_token_id",
                                     "vision_end_token_id")}
    hf_config = transformers.Qwen2_5_VLConfig(
        vision_config=vlm.vision.to_dict(), text_config=text,
        tie_word_embeddings=text["tie_word_embeddings"], **token_ids)
    with torch.device("meta"):
        return transformers.Qwen2_5_VLForConditionalGeneration(hf_config)


def _flux(mmdit):
    """diffusers ``FluxTransformer2DModel`` on the meta device, from ``config.mmdit`` minus our extra keys."""
    torch = pytest.importorskip("torch")
    diffusers = pytest.importorskip("diffusers")
    kwargs = mmdit.to_dict()
    accepted = inspect.signature(diffusers.FluxTransformer2DModel.__init__).parameters
    assert sorted(set(kwargs) - set(accepted)) == sorted(common.MMDIT_EXTRA_KEYS)
    with torch.device("meta"):
        return diffusers.FluxTransformer2DModel(**{k: v for k, v in kwargs.items() if k in accepted})


def _vae(vae):
    """diffusers ``AutoencoderKL`` on the meta device, from ``config.vae``."""
    torch = pytest.importorskip("torch")
    diffusers = pytest.importorskip("diffusers")
    with torch.device("meta"):
        return diffusers.AutoencoderKL(**vae.to_dict())


def _count(module):
    return sum(p.numel() for p in module.parameters())


def _flax_path(torch_name):
    """A torch module name in our '/'-joined naming: ``layers.0.mlp`` -> ``layers_0/mlp``."""
    return re.sub(r"\.(\d+)", r"_\1", torch_name).replace(".", "/")


# Every file and variant loads.


@pytest.mark.parametrize("name,variant", STAGE_CONFIGS)
def test_stage_config_loads_and_is_consistent(name, variant):
    config = _config(name, None if variant == "paper" else variant)
    assert isinstance(config, ml_collections.ConfigDict)
    assert config.stage == {"stage1": 1, "stage2": 2, "stage3": 3, "stage3b": 3}[name]
    vlm, mmdit = config.vlm, config.mmdit
    # The pieces fit together.
    assert vlm.vision.out_hidden_size == vlm.text.hidden_size == config.connector.in_features
    assert config.connector.out_features == mmdit.joint_attention_dim == mmdit.pooled_projection_dim
    assert vlm.text.num_attention_heads * vlm.text.head_dim == vlm.text.hidden_size
    assert vlm.text.num_attention_heads % vlm.text.num_key_value_heads == 0
    assert 2 * sum(vlm.text.mrope_section) == vlm.text.head_dim
    assert vlm.vision.hidden_size % (4 * vlm.vision.num_heads) == 0  # 2D rotary over half the ViT head dim
    assert max(vlm.vision.fullatt_block_indexes) < vlm.vision.depth
    merged_patch = vlm.vision.patch_size * vlm.vision.spatial_merge_size
    assert vlm.vision.window_size % merged_patch == 0
    special = (vlm.text.bos_token_id, vlm.text.eos_token_id, vlm.vision_start_token_id, vlm.vision_end_token_id,
               vlm.image_token_id, vlm.video_token_id)
    assert max(special) < vlm.text.vocab_size
    assert sum(mmdit.axes_dims_rope) == mmdit.attention_head_dim
    assert mmdit.in_channels == 4 * config.vae.latent_channels  # 2x2 packing
    assert config.data.side_multiple == 2 * 2 ** (len(config.vae.block_out_channels) - 1)
    assert config.data.resolution == config.resolution
    assert config.data.max_references == config.max_references == 2
    assert ("world" in config.data) == (variant != "paper")
    # The tensor axis (none by default; 4 at paper scale splits the VLM as appendix D does) divides everything
    # the VLM rules split over it.
    tensor = dict(config.mesh)["tensor"] if variant != "paper" else 4
    for size in (vlm.text.num_attention_heads, vlm.text.num_key_value_heads, vlm.text.intermediate_size,
                 vlm.text.vocab_size, vlm.vision.num_heads, vlm.vision.intermediate_size):
        assert size % tensor == 0
    for regex in (*config.trainable, *vlm.lora.targets, *mmdit.lora.targets):
        re.compile(regex)
    assert abs(sum(config.tasks.values()) - 1.0) < 1e-9
    assert config.optim.warmup_steps < config.total_steps


@pytest.mark.parametrize("variant", ["shapes", "tiny"])
def test_shapes_curriculum(variant):
    config = shapes.get_config(None if variant == "shapes" else variant)
    assert isinstance(config, ml_collections.ConfigDict)
    assert [s.stage for s in config.stages] == [1, 2, 3]
    assert [s.name for s in config.stages] == ["stage1", "stage2", "stage3"]
    assert [s.init_from for s in config.stages] == [None, "stage1", "stage2"]
    for stage, module in zip(config.stages, (stage1, stage2, stage3)):
        assert stage.data.world == config.world
        assert stage.batch_size == module.get_config(variant).batch_size
    assert set(config.evaluate.tasks) <= set(config.stages[-1].tasks.keys())
    # Stage 3 continues stage 2's MMDiT: every field that defines its function agrees (pos_embed and rope_theta
    # have no parameters, so a checkpoint would load into a different model without a word).
    large2, large3 = (dict(s.mmdit.to_dict(), lora=None) for s in config.stages[1:])
    assert large2 == large3
    assert config.stages[1].flow == config.stages[2].flow  # and is trained on the same noise levels
    with pytest.raises(ValueError, match="'paper'"):
        shapes.get_config("paper")


def test_shapes_vocabulary_covers_every_prompt():
    """The word-level tokenizer of the shapes configs knows every word ShapesWorld's prompts use, and the
    longest prompt with its images fits ``max_text_tokens``."""
    from qk_jax.data import shapesworld as world_lib

    config = stage3.get_config("shapes")
    assert config.vlm.tokenizer == "word" and _config("stage1", "tiny").vlm.tokenizer == "byte"
    words = set(world_lib.prompt_words(world_lib.default_world())) - {"<image 1>", "<image 2>"}
    assert words <= set(config.vlm.vocabulary)
    assert len(config.vlm.vocabulary) + 1 <= config.vlm.text.bos_token_id  # the words and the unknown word
    longest_words = 25  # "put the subject from <image 1> at the top left and ... with a large red circle at the right"
    image_tokens = (config.resolution // (config.vlm.vision.patch_size * config.vlm.vision.spatial_merge_size)) ** 2 + 2
    assert longest_words + config.max_references * image_tokens <= config.vlm.max_text_tokens


@pytest.mark.parametrize("variant", ["paper", "tiny"])
def test_base_is_stage2_without_its_rows(variant):
    """``common.base`` (for tests and tools) and the stage files assemble the same builders: stage 2 is base plus
    the keys a stage sets (``:shapes`` also raises its ``flow.mean``, hence paper and tiny)."""
    stage_keys = {"stage", "init_from", "trainable", "tasks", "batch_size", "total_steps", "optim"}
    stage = _config("stage2", None if variant == "paper" else variant).to_dict()
    base = common.base(variant).to_dict()
    assert {k: v for k, v in stage.items() if k not in stage_keys} == {
        k: v for k, v in base.items() if k not in stage_keys}


def test_config_comments_hold_no_dates_or_scores():
    """Runs, dates and scores belong in docs/shapesworld_log.md (docs/design.md, "Conventions"); a config comment says
    why and points there."""
    for path in sorted((REPO / "configs").glob("*.py")):
        for number, line in enumerate(path.read_text().splitlines(), 1):
            found = re.search(r"\d{4}-\d{2}-\d{2}|\d+(\.\d+)?%", line)
            assert not found, f"{path.name}:{number}: {found.group()!r}: move it to docs/shapesworld_log.md"


def test_loads_by_path_from_repo_root(monkeypatch):
    """``--config configs/stage3.py:shapes`` loads the file by path, with the repo root as the working dir."""
    monkeypatch.chdir(REPO)
    monkeypatch.syspath_prepend(str(REPO))  # what `python -m qk_jax.train` does for its working dir
    spec = importlib.util.spec_from_file_location("stage3_by_path", "configs/stage3.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.get_config("shapes").to_dict() == stage3.get_config("shapes").to_dict()


# The paper's numbers.


def test_table3_recipe():
    # stage: (batch, steps, lr, resolution), table 3 and section 3.3's upscaling stage.
    expected = {"stage1": (512, 72_000, 1e-4, 512), "stage2": (1024, 420_000, 1e-4, 512),
                "stage3": (512, 30_000, 2e-5, 512), "stage3b": (256, 3_000, 1e-5, 1024)}
    for name, (batch, steps, lr, res) in expected.items():
        config = _config(name)
        assert (config.batch_size, config.total_steps, config.optim.lr, config.resolution) == (batch, steps, lr, res)
        assert config.data.resolution == res
        assert config.data.side_multiple == 16
    assert (_config("stage1").init_from, _config("stage2").init_from) == (None, "/tmp/qk_stage1")
    assert [_config(n).in_context for n in STAGES] == [False, False, True, True]


def test_lora_and_queries():
    # (VLM rank, alpha), (MMDiT rank, alpha): section 3.3; rank 0 = no adapter (stage 2 merged the VLM's).
    expected = {"stage1": ((128, 256), (0, 0)), "stage2": ((0, 0), (0, 0)),
                "stage3": ((0, 0), (256, 256)), "stage3b": ((0, 0), (256, 256))}
    for name, (vlm_lora, mmdit_lora) in expected.items():
        config = _config(name)
        assert (config.vlm.lora.rank, config.vlm.lora.alpha) == vlm_lora
        assert (config.mmdit.lora.rank, config.mmdit.lora.alpha) == mmdit_lora
        assert config.vlm.num_queries == 128  # K
        assert config.max_references == 2  # N
        assert config.vlm.max_text_tokens == 512


def test_model_dims():
    config = _config("stage2")
    vision, text = config.vlm.vision, config.vlm.text
    assert (vision.depth, vision.num_heads, vision.hidden_size // vision.num_heads) == (32, 16, 80)
    assert (vision.intermediate_size, vision.patch_size, vision.spatial_merge_size) == (3420, 14, 2)
    assert (vision.window_size, tuple(vision.fullatt_block_indexes)) == (112, (7, 15, 23, 31))
    assert (text.num_hidden_layers, text.num_attention_heads, text.num_key_value_heads) == (28, 28, 4)
    assert (text.head_dim, text.intermediate_size, text.hidden_size) == (128, 18944, 3584)
    assert (tuple(text.mrope_section), text.rope_theta, text.tie_word_embeddings) == ((16, 24, 24), 1e6, False)
    assert (config.vlm.image_token_id, config.vlm.vision_start_token_id) == (151655, 151652)
    connector = config.connector
    assert (connector.in_features, connector.hidden_features, connector.out_features) == (3584, 960, 2560)
    assert connector.in_features * 960 + 960 + 960 * 2560 + 2560 == 5_901_760  # table 11: 5.9M
    mmdit = config.mmdit
    assert (mmdit.num_layers, mmdit.num_single_layers, mmdit.num_attention_heads) == (42, 0, 40)
    assert (mmdit.attention_head_dim, mmdit.mlp_ratio * 2560, tuple(mmdit.axes_dims_rope)) == (64, 10240, (16, 24, 24))
    assert (mmdit.in_channels, mmdit.patch_size, mmdit.rope_theta) == (64, 1, 10000)
    light = _config("stage1").mmdit
    assert (light.num_layers, light.num_attention_heads, light.attention_head_dim) == (10, 24, 64)
    vae = config.vae
    assert (vae.latent_channels, len(vae.block_out_channels) - 1, vae.scaling_factor, vae.shift_factor) == (
        16, 3, 0.3611, 0.1159)  # 8x down


def test_buckets_mesh_and_sharding():
    config = _config("stage3")
    ratios = {(1, 1), (1, 2), (2, 3), (3, 4), (3, 5), (4, 5), (9, 16)}
    assert set(config.data.aspect_ratios) == ratios | {(h, w) for w, h in ratios}
    assert len(config.data.aspect_ratios) == len(set(config.data.aspect_ratios)) == 13  # 1:1 is its own transpose
    assert tuple(config.mesh) == (("data", -1), ("fsdp", 1), ("tensor", 1))
    assert dict(_config("stage3", "shapes").mesh) == {"data": -1, "fsdp": 1, "tensor": 1}
    sharding = config.sharding
    vlm_rules, mmdit_rules = dict(sharding.vlm_rules), dict(sharding.mmdit_rules)
    assert {k for k, v in vlm_rules.items() if v} == {"heads", "kv_heads", "mlp", "vocab"}
    assert set(vlm_rules.values()) == {"tensor", None}
    assert set(mmdit_rules) == set(vlm_rules) and set(mmdit_rules.values()) == {None}
    assert (sharding.mmdit_zero_stage, tuple(sharding.opt_state_axes)) == (2, ("data", "fsdp"))


# What trains.


def test_trainable_leaves():
    paths = {
        "vlm/model/layers_0/self_attn/q_proj/lora_a": {"stage1"},
        "vlm/model/layers_0/mlp/down_proj/lora_b": {"stage1"},
        "vlm/model/layers_0/self_attn/q_proj/kernel": set(),
        "vlm/visual/blocks_0/attn/qkv/kernel": set(),
        "vlm/kontext_queries": set(STAGES),
        "connector/fc1/kernel": set(STAGES),
        "mmdit/transformer_blocks_0/attn/to_q/kernel": {"stage1", "stage2"},
        "mmdit/transformer_blocks_0/attn/to_q/lora_a": set(STAGES),  # stages 1-2 have none: all of mmdit trains
        "mmdit/proj_out/bias": {"stage1", "stage2"},
        "vae/encoder/conv_in/kernel": set(),
        "vae/decoder/mid_block/attentions_0/to_q/lora_a": set(),
    }
    for name in STAGES:
        trainable = _config(name).trainable
        for path, stages in paths.items():
            assert match_any(path, trainable) == (name in stages), (name, path)


def test_lora_targets_match_the_reference_module_names():
    """The targets pick exactly the LLM's 7 projections per layer and FLUX's 12 per double-stream block."""
    config = _config("stage3", "tiny")
    qwen = [_flax_path(n) for n, _ in _qwen_vl(config.vlm).named_modules()]
    picked = [n for n in qwen if match_any(n, config.vlm.lora.targets)]
    assert len(picked) == 7 * config.vlm.text.num_hidden_layers
    assert all("/language_model/layers_" in n for n in picked)
    flux = [_flax_path(n) for n, _ in _flux(config.mmdit).named_modules()]
    picked = [n for n in flux if match_any(n, config.mmdit.lora.targets)]
    double = [n for n in picked if n.startswith("transformer_blocks_")]
    assert len(double) == 12 * config.mmdit.num_layers
    assert "transformer_blocks_0/attn/to_out_0" in double and "transformer_blocks_0/ff_context/net_2" in double
    assert not any("norm" in n or "embed" in n or n == "proj_out" for n in picked)


# Parameter counts of the reference implementations (docs/design.md).


def test_paper_parameter_counts():
    large, light = _flux(_config("stage2").mmdit), _flux(_config("stage1").mmdit)
    assert _count(large) == 9_952_604_736
    assert _count(light) == 867_713_600  # section 3.3: ~870M
    assert large.transformer_blocks[0].ff.net[0].proj.out_features == 10240  # mlp_ratio 4 of 2560
    assert large.pos_embed.theta == _config("stage2").mmdit.rope_theta
    vae = _vae(_config("stage2").vae)
    assert (_count(vae.encoder), _count(vae.decoder)) == (34_274_208, 49_545_475)
    assert _count(_qwen_vl(_config("stage2").vlm)) == 8_292_166_656


@pytest.mark.parametrize("flux", ["dev", "schnell"])
def test_flux_layouts_are_flux1s_transformer(flux):
    """``flux=dev``/``schnell``: FLUX.1's transformer as diffusers builds it from our config (FLUX.1-dev: 11.9B,
    its guidance embedder 0.01B more than schnell), the connector at its context and pooled widths, and the light
    head of stage 1 at the same widths, so that the connector carries over."""
    config, light = _config("stage2", f"flux={flux}"), _config("stage1", f"flux={flux}")
    large = _flux(config.mmdit)
    assert _count(large) == {"dev": 11_901_408_320, "schnell": 11_891_178_560}[flux]
    assert (len(large.transformer_blocks), len(large.single_transformer_blocks)) == (19, 38)
    assert (config.connector.out_features, config.connector.pooled_features) == (4096, 768)
    assert (light.mmdit.joint_attention_dim, light.mmdit.pooled_projection_dim) == (4096, 768)
    assert light.connector == config.connector
    with pytest.raises(ValueError, match="flux='pro'"):
        _config("stage2", "flux=pro")
    with pytest.raises(ValueError, match="no 'shapes' layout"):
        _config("stage2", "shapes,flux=dev")


@pytest.mark.parametrize("variant", ["shapes", "tiny"])
def test_small_variants_build_the_reference_models(variant):
    """The small dims are valid for the reference models (the parity tests build them); ShapesWorld's whole
    model (VLM, light and large MMDiT, VAE, connector) stays at a few million parameters."""
    config, light = _config("stage3", variant), _config("stage1", variant).mmdit
    connector = config.connector
    total = sum(_count(m) for m in (_qwen_vl(config.vlm), _flux(config.mmdit), _flux(light), _vae(config.vae)))
    total += (connector.in_features + 1) * connector.hidden_features
    total += (connector.hidden_features + 1) * connector.out_features
    assert total < {"shapes": 10_000_000, "tiny": 500_000}[variant]


# The config argument.


def test_parse_arg():
    arg = common.parse_arg("shapes,batch=8", **common.STAGE_ARGS)
    assert (arg.variant, arg.batch, arg.res, arg.steps) == ("shapes", 8, 0, 0)
    assert common.parse_arg(None, **common.STAGE_ARGS).variant == "paper"
    assert common.parse_arg("res=1024", **common.STAGE_ARGS).res == 1024
    typed = common.parse_arg("tiny, lr=0.5, flag=true, name=x", lr=0.1, flag=False, name="")
    assert (typed.lr, typed.flag, typed.name) == (0.5, True, "x")
    with pytest.raises(ValueError, match="'huge'.*paper, shapes, tiny"):
        common.parse_arg("huge", **common.STAGE_ARGS)
    with pytest.raises(ValueError, match="'bacth'.*batch, flux, res, steps"):
        stage1.get_config("shapes,bacth=8")
    with pytest.raises(ValueError, match="batch='eight'.*int"):
        common.parse_arg("batch=eight", **common.STAGE_ARGS)
    with pytest.raises(ValueError, match="two variants"):
        common.parse_arg("shapes,tiny")


def test_arg_overrides():
    config = stage3.get_config("shapes,batch=8,steps=10,res=96")
    assert (config.batch_size, config.total_steps) == (8, 10)
    assert config.resolution == config.data.resolution == 96
    assert stage3b.get_config("res=768").data.resolution == 768
    config.resolution = 48  # --config.resolution=48 moves the data's too
    assert config.data.resolution == 48
