"""Parity with diffusers' FluxTransformer2DModel: load -> same outputs, export -> same tensors, same sizes.

Tiny random torch models (fixed seed, every weight randomised, zero-initialised ones included) are saved with
``save_pretrained`` to a temp dir; nothing is downloaded.
"""

import json

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import FluxTransformer2DModel

from configs import stage1
from qk_jax.convert import diffusers_mmdit
from qk_jax.convert.safetensors_io import CheckpointError, SafetensorsReader
from qk_jax.models.lora import LoRAConfig
from qk_jax.models.mmdit import MMDiT, MMDiTConfig, abstract_params, param_count, sincos_pos_embed, with_layout
from qk_jax.ops import rope
from qk_jax.pytree import leaf_paths

TINY = dict(num_layers=2, num_single_layers=1, num_attention_heads=2, attention_head_dim=16, joint_attention_dim=24,
            pooled_projection_dim=20, in_channels=8, axes_dims_rope=(4, 6, 6))


def _random_flux(seed=0, **overrides):
    """A tiny FluxTransformer2DModel with every parameter drawn at random (weights ~ N(0, 1/fan_in), biases
    N(0, 0.05^2), RMSNorm scales 1 + N(0, 0.1^2)), so that no zero-initialised layer hides a mapping error."""
    torch.manual_seed(seed)
    model = FluxTransformer2DModel(**{**TINY, **overrides}).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 2:
                torch.nn.init.normal_(p, std=p.shape[1] ** -0.5)
            elif "norm" in name and "linear" not in name:
                torch.nn.init.normal_(p, mean=1.0, std=0.1)
            else:
                torch.nn.init.normal_(p, std=0.05)
    return model


@pytest.fixture(scope="module", params=[False, True], ids=["plain", "guidance"])
def flux(request, tmp_path_factory):
    """(torch model, its save_pretrained folder) with and without the guidance embedder."""
    model = _random_flux(guidance_embeds=request.param, out_channels=6, patch_size=2)
    path = tmp_path_factory.mktemp("flux")
    model.save_pretrained(path)
    return model, path


def _inputs(cfg, batch_roles, text_len=5, seed=0):
    """Inputs for our model; image ids per sample from sRoPE's in-context layout (source: negative coordinates,
    references: shifted)."""
    layout = rope.in_context_layout(2, 3, jnp.asarray(batch_roles))
    batch, tokens = layout.kind.shape
    rng = np.random.default_rng(seed)
    f32 = lambda *s: rng.standard_normal(s).astype(np.float32)
    inputs = dict(hidden_states=f32(batch, tokens, cfg.in_channels), img_ids=np.array(layout.ids),
                  encoder_hidden_states=f32(batch, text_len, cfg.joint_attention_dim),
                  txt_ids=np.array(rope.text_position_ids(text_len)),
                  timestep=np.array([0.35, 0.9], np.float32)[:batch],
                  pooled_projections=f32(batch, cfg.pooled_projection_dim))
    if cfg.guidance_embeds:
        inputs["guidance"] = np.array([3.5, 1.0], np.float32)[:batch]
    return inputs


def _torch_forward(model, inputs, b):
    """diffusers on sample ``b`` alone: it takes batch-shared ids ``[S, 3]``, so each sample brings its own."""
    t = lambda k: torch.from_numpy(np.ascontiguousarray(inputs[k][b:b + 1]))
    with torch.no_grad():
        out = model(hidden_states=t("hidden_states"), encoder_hidden_states=t("encoder_hidden_states"),
                    pooled_projections=t("pooled_projections"), timestep=t("timestep"),
                    img_ids=torch.from_numpy(inputs["img_ids"][b]), txt_ids=torch.from_numpy(inputs["txt_ids"]),
                    guidance=t("guidance") if "guidance" in inputs else None)
    return out.sample[0].numpy()


def test_outputs_match_diffusers(flux):
    """A subject-edit sample [src, noise, ref] and a two-reference sample [noise, ref1, ref2], batch of 2."""
    model, path = flux
    cfg, params = diffusers_mmdit.load(path)
    assert cfg == MMDiTConfig(**TINY, out_channels=6, patch_size=2, guidance_embeds=model.config.guidance_embeds)
    inputs = _inputs(cfg, [[rope.SOURCE, rope.REFERENCE], [rope.REFERENCE, rope.REFERENCE]])
    assert inputs["img_ids"].min() < 0 and inputs["img_ids"].max() >= 2 * 3  # negative and shifted coordinates
    ours = jax.jit(MMDiT(cfg).apply)({"params": params}, **inputs)
    assert ours.shape == (2, 18, 4 * 6)
    for b in range(2):
        chex.assert_trees_all_close(ours[b], _torch_forward(model, inputs, b), atol=1e-4)


@pytest.mark.parametrize("scan_layers", [False, True], ids=["per_layer", "scanned"])
def test_export_reproduces_the_state_dict(flux, tmp_path, scan_layers):
    """Per-layer params, or a scan_layers model's layer-stacked ones: the same diffusers state dict."""
    model, path = flux
    cfg, params = diffusers_mmdit.load(path)
    params = with_layout(params, cfg, scan_layers)
    assert ("transformer_blocks" in params) == scan_layers
    diffusers_mmdit.export(cfg, params, tmp_path / "out", max_shard_bytes=40_000)  # sharded, with an index
    assert (tmp_path / "out" / "diffusion_pytorch_model.safetensors.index.json").is_file()
    reloaded = FluxTransformer2DModel.from_pretrained(tmp_path / "out")
    expected, got = model.state_dict(), reloaded.state_dict()
    assert sorted(got) == sorted(expected)
    for name, tensor in expected.items():
        assert torch.equal(got[name], tensor), name


def test_export_merges_lora_or_refuses(tmp_path):
    cfg = MMDiTConfig(**TINY)
    lora = LoRAConfig(rank=2, alpha=4.0, targets=(r"attn/to_q$",))
    model = MMDiT(cfg, lora=lora)
    inputs = _inputs(cfg, [[rope.SOURCE]] * 2)
    params = nn.meta.unbox(jax.eval_shape(lambda: model.init(jax.random.key(0), **inputs)))
    params = jax.tree.map(lambda s: np.full(s.shape, 0.01, np.float32), params["params"])
    with pytest.raises(ValueError, match="lora_alpha"):
        diffusers_mmdit.export(cfg, params, tmp_path / "refused")
    diffusers_mmdit.export(cfg, params, tmp_path / "merged", lora_alpha=4.0, dtype=jnp.bfloat16)
    reader = SafetensorsReader(tmp_path / "merged", diffusers_mmdit.WEIGHTS_NAME)
    assert reader.get("transformer_blocks.0.attn.to_q.weight").dtype == jnp.bfloat16
    reloaded = FluxTransformer2DModel.from_pretrained(tmp_path / "merged")
    # W + (alpha / rank) A B = 0.01 + 2 * 2 * 0.01 * 0.01 everywhere.
    np.testing.assert_allclose(reloaded.transformer_blocks[0].attn.to_q.weight.detach().numpy(), 0.0104, rtol=4e-3)
    np.testing.assert_allclose(reloaded.transformer_blocks[0].attn.to_k.weight.detach().numpy(), 0.01, rtol=4e-3)


def test_load_bfloat16(flux):
    _, path = flux
    _, params = diffusers_mmdit.load(path, dtype=jnp.bfloat16)
    assert {a.dtype for a in jax.tree.leaves(params)} == {np.dtype(jnp.bfloat16)}


def test_sincos_pos_embed_matches_diffusers():
    """SD3's embedding (diffusers) of a square target grid, and of shifted in-context ids through its grid form."""
    from diffusers.models.embeddings import get_2d_sincos_pos_embed, get_2d_sincos_pos_embed_from_grid
    dim, side = 32, 5
    ids = rope.image_position_ids(side, side)  # [side * side, 3] (0, row, col), row-major like diffusers
    want = get_2d_sincos_pos_embed(dim, side, base_size=side, output_type="pt").numpy()
    chex.assert_trees_all_close(sincos_pos_embed(ids, dim), want.astype(np.float32), atol=1e-6)
    layout = rope.in_context_layout(2, 3, jnp.asarray([[rope.SOURCE, rope.REFERENCE]]))
    ids = np.asarray(layout.ids[0])
    assert ids[:, 1:].min() < 0 and ids[:, 1:].max() > 2  # negative (source) and shifted (reference) positions
    grid = torch.from_numpy(np.stack([ids[:, 2], ids[:, 1]]).astype(np.float64))  # diffusers: (col, row)
    want = get_2d_sincos_pos_embed_from_grid(dim, grid, output_type="pt").numpy()
    chex.assert_trees_all_close(sincos_pos_embed(ids, dim), want.astype(np.float32), atol=1e-5)


def test_table_covers_exactly_our_params():
    for cfg in (MMDiTConfig(**TINY), MMDiTConfig(**TINY, guidance_embeds=True)):
        table = diffusers_mmdit.tensor_table(cfg)
        assert sorted(t.ours for t in table) == sorted(leaf_paths(nn.meta.unbox(abstract_params(cfg))))
        assert len({t.diffusers for t in table}) == len(table)


@pytest.mark.parametrize("name", ["tiny", "light"])
def test_param_count_equals_diffusers_on_meta(name):
    kwargs = (dict(TINY, guidance_embeds=True, out_channels=6, patch_size=2) if name == "tiny" else
              MMDiTConfig.from_config(stage1.get_config().mmdit).to_diffusers_config())
    with torch.device("meta"):
        reference = FluxTransformer2DModel(**kwargs)
    assert param_count(MMDiTConfig(**kwargs)) == sum(p.numel() for p in reference.parameters())


def test_wrong_model_type(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"_class_name": "AutoencoderKL", "latent_channels": 16}))
    with pytest.raises(CheckpointError, match="_class_name='AutoencoderKL'"):
        diffusers_mmdit.load(tmp_path)


def test_mismatched_shape_names_the_tensor(flux, tmp_path):
    model, path = flux
    model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps(dict(config, joint_attention_dim=32)))
    with pytest.raises(CheckpointError, match=r"'context_embedder.weight' has shape \(32, 24\) but the model expects"
                                              r" \(32, 32\)"):
        diffusers_mmdit.load(tmp_path)


def test_missing_tensors_are_named(flux, tmp_path):
    model, path = flux
    model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps(dict(config, num_layers=3)))
    with pytest.raises(CheckpointError, match=r"32 tensors .* missing: transformer_blocks\.2\.norm1\.linear\.weight"):
        diffusers_mmdit.load(tmp_path)


def test_unused_tensors_are_logged(flux, tmp_path, monkeypatch):
    model, _ = flux
    model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps(dict(config, num_single_layers=0)))
    messages = []
    monkeypatch.setattr(diffusers_mmdit.logging, "warning", lambda msg, *args: messages.append(msg % args))
    diffusers_mmdit.load(tmp_path)
    assert any("single_transformer_blocks.0.proj_out.weight" in m for m in messages), messages
