"""Parity of the exported model in torch (``qk_jax.convert.torch_reference``) with ``QueryKontext`` in JAX.

A tiny stage-3 checkpoint (``configs/stage3.py:tiny``) with every parameter drawn at random, the MMDiT's LoRA
adapters included (``lora_b`` non-zero: the LoRA is randomised, not trained), is saved with ``save_model``,
exported with ``python -m qk_jax.convert export`` and loaded back with transformers/diffusers'
``from_pretrained``. The same prompt, images and latents go through both sides: the VLM + connector output and
the velocity of an edit sample (one source) and a customization sample (two references) in one batch must agree
within 1e-4 in float32.
"""

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import stage3
from qk_jax.convert import __main__ as cli
from qk_jax.models import saved_model
from qk_jax.models import vae as vae_lib
from qk_jax.models.query_kontext import QueryKontext, QueryKontextConfig
from qk_jax.ops import rope
from qk_jax.pytree import flatten, unflatten

torch = pytest.importorskip("torch")
from qk_jax.convert import torch_reference  # noqa: E402

ATOL = 1e-4
CONFIG = stage3.get_config("tiny")
MODEL = QueryKontext(QueryKontextConfig.from_config(CONFIG))
GRID = (1, 4, 4)  # one image in ViT patches: 2x2 merged tokens
H = W = 2  # latent grid in tokens


def random_params(seed=0):
    """Every leaf random: kernels ~ N(0, 1/fan_in), norm scales 1 + N(0, 0.1^2), the rest N(0, 0.05^2) (LoRA's
    ``lora_b`` too: the adapters change the output), queries N(0, 1)."""
    rng = np.random.default_rng(seed)
    out = {}
    for path, leaf in flatten(nn.meta.unbox(MODEL.abstract_params())).items():
        shape = tuple(leaf.shape)
        name = path.rsplit("/", 1)[-1]
        if name == "scale":
            value = 1 + 0.1 * rng.standard_normal(shape)
        elif name in ("kernel", "lora_a") and len(shape) >= 2:
            value = rng.standard_normal(shape) / np.sqrt(np.prod(shape[:-1]))
        elif name == "kontext_queries":
            value = rng.standard_normal(shape)
        else:
            value = 0.05 * rng.standard_normal(shape)
        out[path] = value.astype(np.float32)
    return unflatten(out)


@pytest.fixture(scope="module")
def export_folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("kontext")
    params = random_params()
    assert any(p.endswith("lora_b") for p in flatten(params["mmdit"]))
    saved_model.save_model(root / "ckpt", CONFIG, params, meta=dict(stage=3))
    cli.main(["export", "--checkpoint", str(root / "ckpt"), "--out", str(root / "export")])
    return params, root / "export"


@pytest.fixture(scope="module")
def exported(export_folder):
    params, folder = export_folder
    return params, torch_reference.KontextPipeline.from_exported(folder)


def prompts(seed=0):
    """Two samples with two images each (vision start, 4 image pads, vision end), the second one padded."""
    c = MODEL.config.vlm
    rng = np.random.default_rng(seed)
    image = [c.vision_start_token_id] + [c.image_token_id] * (np.prod(GRID) // 4) + [c.vision_end_token_id]
    rows = [rng.integers(0, 90, 5).tolist() + image + rng.integers(0, 90, 3).tolist() + image + [7, 8],
            rng.integers(0, 90, 2).tolist() + image + image + [9]]
    length = max(map(len, rows))
    ids = np.zeros((2, length), np.int32)
    mask = np.zeros((2, length), np.int32)
    for b, row in enumerate(rows):
        ids[b, :len(row)], mask[b, :len(row)] = row, 1
    pixels = rng.standard_normal((2, 2, int(np.prod(GRID)), c.vision.patch_dim)).astype(np.float32)  # [B, M, P, D]
    return ids, mask, pixels


def _torch_condition(pipe, ids, mask, pixels):
    b, m, p, d = pixels.shape
    return pipe.condition(torch.from_numpy(ids).long(), torch.from_numpy(mask).long(),
                          torch.from_numpy(pixels.reshape(b * m * p, d)), torch.tensor([GRID] * (b * m)))


@pytest.fixture(scope="module")
def conditioned(exported):
    """The conditioning of ``prompts()`` by JAX and by torch."""
    params, pipe = exported
    ids, mask, pixels = prompts()
    ours = jax.jit(MODEL.condition, static_argnums=4)(params, ids, mask, pixels, (GRID, GRID))  # not op by op
    return ours, _torch_condition(pipe, ids, mask, pixels)


def test_condition_matches_jax(conditioned):
    ours, ref = conditioned
    np.testing.assert_array_equal(np.asarray(ours.context_mask), ref.context_mask.numpy())
    valid = np.asarray(ours.context_mask)
    print("context max abs err:", np.abs(np.asarray(ours.context)[valid] - ref.context.numpy()[valid]).max())
    chex.assert_trees_all_close(np.asarray(ours.context)[valid], ref.context.numpy()[valid], atol=ATOL, rtol=0)
    chex.assert_trees_all_close(np.asarray(ours.pooled), ref.pooled.numpy(), atol=ATOL, rtol=0)


def _velocities(model, params, pipe, conditioned):
    """Sample 0: editing (slot 0 a source, slot 1 empty); sample 1: customization with two references. Each side
    uses its own conditioning (the joint VLM -> connector -> MMDiT path). Returns (JAX of ``params``, torch, and
    the JAX velocity as a function of the params)."""
    cond, ref_cond = conditioned
    rng = np.random.default_rng(1)
    channels = model.config.mmdit.in_channels
    noisy = rng.standard_normal((2, H * W, channels)).astype(np.float32)
    in_context = rng.standard_normal((2, 2, H * W, channels)).astype(np.float32)
    roles = np.array([[rope.SOURCE, rope.NONE], [rope.REFERENCE, rope.REFERENCE]], np.int32)
    t = np.array([0.3, 0.8], np.float32)

    velocity = lambda p: np.asarray(model.velocity(p, cond, jnp.asarray(noisy), jnp.asarray(t), (H, W),
                                                   jnp.asarray(in_context), jnp.asarray(roles)))
    ref = pipe.velocity(ref_cond, torch.from_numpy(noisy), torch.from_numpy(t), (H, W), torch.from_numpy(in_context),
                        torch.from_numpy(roles)).numpy()
    return velocity(params), ref, velocity


def test_velocity_edit_and_customization_match_jax(exported, conditioned):
    params, pipe = exported
    ours, ref, velocity = _velocities(MODEL, params, pipe, conditioned)
    print("velocity max abs err:", np.abs(ours - ref).max(), "scale:", np.abs(ref).max())
    chex.assert_trees_all_close(ours, ref, atol=ATOL, rtol=0)
    # The randomised LoRA matters: without it the velocity is far off, so the export did merge it.
    no_lora = unflatten({k: np.zeros_like(v) if k.endswith("lora_b") else v for k, v in flatten(params).items()})
    assert np.abs(velocity(no_lora) - ref).max() > 100 * ATOL


def test_sincos_pos_embed_exports_and_matches_jax(tmp_path, exported, conditioned):
    """An MMDiT with SD3's sin-cos position embedding (ShapesWorld's) exports to a plain FluxTransformer2DModel
    plus ``pos_embed`` in ``kontext_config.json``; the reference adds the embedding (negative source ids and
    shifted reference ids included) and matches JAX, and without it the velocity is far off."""
    params, plain = exported
    config = CONFIG.copy_and_resolve_references()
    config.mmdit.pos_embed = "sincos"
    model = QueryKontext(QueryKontextConfig.from_config(config))
    saved_model.save_model(tmp_path / "ckpt", config, params, meta=dict(stage=3))
    cli.main(["export", "--checkpoint", str(tmp_path / "ckpt"), "--out", str(tmp_path / "export")])
    pipe = torch_reference.KontextPipeline.from_exported(tmp_path / "export")
    assert pipe.settings["pos_embed"] == "sincos" and "get_2d_sincos" in (tmp_path / "export" / "README.md").read_text()
    ours, ref, _ = _velocities(model, params, pipe, conditioned)
    print("velocity max abs err:", np.abs(ours - ref).max(), "scale:", np.abs(ref).max())
    chex.assert_trees_all_close(ours, ref, atol=ATOL, rtol=0)
    _, without, _ = _velocities(MODEL, params, plain, conditioned)  # the same weights, no embedding
    assert np.abs(without - ref).max() > 100 * ATOL


@pytest.mark.parametrize("source_offset", rope.SOURCE_OFFSETS)
def test_srope_ids_match_jax(source_offset):
    roles = np.array([[rope.SOURCE, rope.REFERENCE, rope.REFERENCE]], np.int32)
    layout = rope.in_context_layout(2, 3, jnp.asarray(roles), source_offset)
    tokens = np.arange(4 * 6, dtype=np.float32).reshape(4, 6, 1)  # target, slot 0, 1, 2
    stream, ids, start = torch_reference.in_context_stream(torch.from_numpy(tokens[0]), torch.from_numpy(tokens[1:]),
                                                           roles[0].tolist(), 2, 3, source_offset)
    np.testing.assert_array_equal(ids.numpy(), np.asarray(layout.ids[0]))
    ours = np.asarray(rope.gather_blocks(jnp.asarray(tokens.reshape(1, -1, 1)), layout.order))[0]
    np.testing.assert_array_equal(stream.numpy(), ours)
    assert start == 6


def test_euler_sampling_runs(exported, conditioned):
    _, pipe = exported
    cond = conditioned[1]
    sigmas = pipe.sigmas(4, H * W)
    assert sigmas[0] > sigmas[1] > sigmas[-2] > sigmas[-1] == 0
    x = pipe.sample(cond, (H, W), num_steps=2, generator=torch.Generator().manual_seed(0))
    assert x.shape == (2, H * W, MODEL.config.mmdit.in_channels) and torch.isfinite(x).all()
    images = pipe.decode(x, (H, W))
    f = 2 * MODEL.config.vae.downsample_factor
    assert images.shape == (2, 3, H * f, W * f)


def test_decode_unpacks_as_qk_jax_packs():
    """``decode``'s unpacking inverts ``qk_jax.models.vae.pack_latents`` (NHWC latents -> [B, h*w, 4C] tokens)."""
    latents = np.random.default_rng(2).standard_normal((2, 2 * H, 2 * W, 3)).astype(np.float32)
    tokens = torch.from_numpy(np.array(vae_lib.pack_latents(jnp.asarray(latents))))
    z = torch_reference.unpack_latents(tokens, (H, W))
    np.testing.assert_array_equal(z.numpy(), latents.transpose(0, 3, 1, 2))


def test_a_stock_flux_pipeline_renders_an_exports_t2i_as_the_reference(exported):
    """The README's snippet: diffusers' own ``FluxPipeline`` on the exported transformer and VAE, fed our
    conditioning as ``prompt_embeds`` (padding dropped) and ``pooled_prompt_embeds``, with FLUX's scheduler set to
    the export's flow shift, renders the same t2i image as ``KontextPipeline`` from the same noise."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline

    _, pipe = exported
    ids = np.random.default_rng(3).integers(0, 90, (1, 9)).astype(np.int32)  # one sample, text only,
    mask = (np.arange(9) < 7).astype(np.int32)[None]  # padded at the end
    cond = pipe.condition(torch.from_numpy(ids).long(), torch.from_numpy(mask).long())
    f = pipe.settings["flow"]
    scheduler = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, base_shift=f["base_shift"],
                                                max_shift=f["max_shift"], base_image_seq_len=f["base_seq_len"],
                                                max_image_seq_len=f["max_seq_len"])
    flux = FluxPipeline(scheduler=scheduler, vae=pipe.vae, transformer=pipe.transformer, text_encoder=None,
                        tokenizer=None, text_encoder_2=None, tokenizer_2=None)
    h, w, steps = 2, 3, 4
    noise = torch.randn(1, h * w, pipe.transformer.config.in_channels, generator=torch.Generator().manual_seed(0))
    pixels = 2 * h * flux.vae_scale_factor, 2 * w * flux.vae_scale_factor
    theirs = flux(prompt_embeds=cond.context[:, cond.context_mask[0]], pooled_prompt_embeds=cond.pooled,
                  latents=noise, height=pixels[0], width=pixels[1], num_inference_steps=steps, output_type="pt").images
    ours = pipe.decode(pipe.sample(cond, (h, w), steps, noise=noise), (h, w))

    def to_uint8(x):  # FluxPipeline's own post-processing: [-1, 1] -> [0, 1] -> bytes
        return (x / 2 + 0.5).clamp(0, 1).mul(255).round().to(torch.uint8).numpy()

    assert len(np.unique(to_uint8(ours))) > 20  # an image, not a saturated blank
    np.testing.assert_array_equal(to_uint8(theirs * 2 - 1), to_uint8(ours))
