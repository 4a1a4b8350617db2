"""The VAE against diffusers' AutoencoderKL (tiny random models, float32), latent packing against FluxPipeline."""

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL as TorchAutoencoderKL
from diffusers import FluxPipeline
from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

from configs import common
from qk_jax.convert import diffusers_vae
from qk_jax.pytree import path_str
from qk_jax.models.vae import (
    AutoencoderKL,
    VAEConfig,
    kl_divergence,
    latents_from_posterior,
    pack_latents,
    scale_latents,
    unpack_latents,
    unscale_latents,
)

# The FLUX.1 layout at test size: 16 latent channels, no quant convs, one downsampling (factor 2).
FLUX_TINY = dict(block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=8, latent_channels=16,
                 use_quant_conv=False, use_post_quant_conv=False, scaling_factor=0.3611, shift_factor=0.1159)
# SD-style: quant_conv/post_quant_conv, 4 latent channels, no shift.
SD_TINY = dict(block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=8, latent_channels=4,
               use_quant_conv=True, use_post_quant_conv=True)

# diffusers' FLUX.1 VAE (paper table 11) parameter counts, as printed by
# sum(p.numel() for p in AutoencoderKL(**flux_config).{encoder,decoder}.parameters()).
FLUX_ENCODER_PARAMS = 34_274_208
FLUX_DECODER_PARAMS = 49_545_475


def _config(**overrides):
    """A VAEConfig from FLUX_TINY with ``overrides``, one block type per width."""
    kwargs = {**FLUX_TINY, **overrides}
    n = len(kwargs["block_out_channels"])
    return VAEConfig(down_block_types=("DownEncoderBlock2D",) * n, up_block_types=("UpDecoderBlock2D",) * n, **kwargs)


def _random_params(config, seed=0):
    """Random params of the right tree and shapes. (Drawn with NumPy: on CPU, compiling ``init``'s threefry
    draws takes tens of seconds, and these tests do not need flax's initialisers.)"""
    rng = np.random.default_rng(seed)
    abstract = diffusers_vae.abstract_params(config)
    return jax.tree.map(lambda a: jnp.asarray(0.2 * rng.standard_normal(a.shape), jnp.float32), abstract)


def _torch_vae(kwargs, seed=0):
    """A random diffusers AutoencoderKL whose norms and biases are random too (not 1/0), so a swapped or
    mis-mapped vector shows up. Two logvar biases are pushed past diffusers' clamp range [-30, 20]."""
    torch.manual_seed(seed)
    model = TorchAutoencoderKL(down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                               **kwargs).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 1:
                p.copy_((1.0 if "norm" in name and name.endswith("weight") else 0.0) + 0.1 * torch.randn_like(p))
        latent = kwargs["latent_channels"]
        bias = (model.quant_conv if kwargs["use_quant_conv"] else model.encoder.conv_out).bias
        bias[latent] += 80.0
        bias[latent + 1] -= 80.0
    return model


def _images(shape, seed=0):
    return np.random.default_rng(seed).uniform(-1, 1, shape).astype(np.float32)  # NHWC in [-1, 1]


def _to_nchw(x):
    return torch.from_numpy(np.ascontiguousarray(np.asarray(x).transpose(0, 3, 1, 2)))


def _to_nhwc(t):
    return t.detach().numpy().transpose(0, 2, 3, 1)


@pytest.fixture(scope="module", params=["flux", "sd"])
def pair(request, tmp_path_factory):
    """(torch model, our config, our params) for one tiny config, through save_pretrained and our converter."""
    kwargs = FLUX_TINY if request.param == "flux" else SD_TINY
    torch_model = _torch_vae(kwargs)
    folder = tmp_path_factory.mktemp(f"vae_{request.param}")
    torch_model.save_pretrained(folder)
    config, params = diffusers_vae.load(folder)
    return torch_model, config, params


def test_encode_decode_match_diffusers(pair):
    torch_model, config, params = pair
    model = AutoencoderKL(config)
    images = _images((2, 16, 16, 3))
    mean, logvar = jax.jit(lambda p, x: model.apply({"params": p}, x, method=model.encode))(params, images)
    with torch.no_grad():
        posterior = torch_model.encode(_to_nchw(images)).latent_dist
    chex.assert_trees_all_close(mean, _to_nhwc(posterior.mean), atol=1e-4, rtol=0)
    chex.assert_trees_all_close(logvar, _to_nhwc(posterior.logvar), atol=1e-4, rtol=0)
    # The clamp is exercised: the pushed channels sit on diffusers' bounds.
    c = config.latent_channels
    np.testing.assert_array_equal(np.asarray(logvar[..., 0]), 20.0)
    np.testing.assert_array_equal(np.asarray(logvar[..., 1]), -30.0)

    latents = np.random.default_rng(1).standard_normal((2, 8, 8, c)).astype(np.float32)
    decoded = jax.jit(lambda p, z: model.apply({"params": p}, z, method=model.decode))(params, latents)
    with torch.no_grad():
        expected = torch_model.decode(_to_nchw(latents)).sample
    assert decoded.shape == (2, 16, 16, 3)
    chex.assert_trees_all_close(decoded, _to_nhwc(expected), atol=1e-4, rtol=0)


def test_encoder_and_decoder_need_only_their_params(pair):
    """The trainer holds the encoder side, the sampler the decoder side."""
    _, config, params = pair
    model = AutoencoderKL(config)
    enc_side = {k: v for k, v in params.items() if k in ("encoder", "quant_conv")}
    dec_side = {k: v for k, v in params.items() if k in ("decoder", "post_quant_conv")}
    mean, _ = jax.jit(lambda p, x: model.apply({"params": p}, x, method=model.encode))(enc_side, _images((1, 8, 8, 3)))
    out = jax.jit(lambda p, z: model.apply({"params": p}, z, method=model.decode))(dec_side, mean)
    assert mean.shape == (1, 4, 4, config.latent_channels) and out.shape == (1, 8, 8, 3)


def test_kl_matches_diffusers():
    rng = np.random.default_rng(0)
    mean = rng.standard_normal((2, 4, 6, 16)).astype(np.float32)
    logvar = rng.uniform(-3, 3, (2, 4, 6, 16)).astype(np.float32)
    expected = DiagonalGaussianDistribution(torch.cat([_to_nchw(mean), _to_nchw(logvar)], dim=1)).kl().numpy()
    chex.assert_trees_all_close(kl_divergence(jnp.asarray(mean), jnp.asarray(logvar)), expected, rtol=1e-5, atol=1e-4)


def test_latents_from_posterior():
    mean = jnp.full((4096, 1, 1, 2), 3.0)
    logvar = jnp.full((4096, 1, 1, 2), np.log(0.25))  # std 0.5
    assert latents_from_posterior(mean, logvar) is mean
    sample = latents_from_posterior(mean, logvar, jax.random.key(0))
    eps = jax.random.normal(jax.random.key(0), mean.shape)
    chex.assert_trees_all_close(sample, 3.0 + 0.5 * eps, atol=1e-6)
    assert abs(float(sample.std()) - 0.5) < 0.02


def test_latent_scaling_is_flux_convention():
    config = VAEConfig.from_config(common.vae("paper"))
    x = jnp.asarray(np.random.default_rng(0).standard_normal((1, 2, 2, 16)), jnp.float32)
    chex.assert_trees_all_close(scale_latents(x, config), (x - 0.1159) * 0.3611, atol=0)
    chex.assert_trees_all_close(unscale_latents(scale_latents(x, config), config), x, atol=1e-6)
    sd = VAEConfig(latent_channels=16)  # diffusers' defaults: scaling 0.18215, no shift
    chex.assert_trees_all_close(scale_latents(x, sd), x * 0.18215, atol=0)


def test_paper_config_parameter_counts():
    """FLUX.1 VAE: encoder 34,274,208 and decoder 49,545,475 parameters (jax.eval_shape, nothing allocated)."""
    config = VAEConfig.from_config(common.vae("paper"))
    assert config.downsample_factor == 8 and config.latent_channels == 16
    params = diffusers_vae.abstract_params(config)
    count = lambda tree: sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))  # noqa: E731
    assert sorted(params) == ["decoder", "encoder"]
    assert count(params["encoder"]) == FLUX_ENCODER_PARAMS
    assert count(params["decoder"]) == FLUX_DECODER_PARAMS


def test_params_carry_logical_axes():
    config = _config(block_out_channels=(8, 16), norm_num_groups=4)
    boxed = jax.eval_shape(AutoencoderKL(config).init, jax.random.key(0), jnp.zeros((1, 4, 4, 3)))["params"]
    is_box = lambda x: isinstance(x, nn.LogicallyPartitioned)  # noqa: E731
    names = {path_str(p): box.names for p, box in jax.tree_util.tree_flatten_with_path(boxed, is_leaf=is_box)[0]}
    assert names["encoder/conv_in/kernel"] == (None, None, "conv_in", "conv_out")
    assert names["encoder/conv_in/bias"] == ("conv_out",)
    assert names["decoder/mid_block/attentions_0/to_q/kernel"] == ("conv_in", "conv_out")
    assert names["encoder/down_blocks_0/resnets_0/norm1/scale"] == ("norm",)
    assert names["decoder/up_blocks_0/upsamplers_0/conv/kernel"] == (None, None, "conv_in", "conv_out")


def test_bfloat16_compute_stays_close():
    config = _config(block_out_channels=(8, 16), norm_num_groups=4)
    images = jnp.asarray(_images((1, 8, 8, 3)))
    params = _random_params(config)

    def encode(dtype):
        model = AutoencoderKL(config, dtype=dtype)
        return jax.jit(lambda p, x: model.apply({"params": p}, x, method=model.encode)[0])(params, images)

    mean32, mean16 = encode(jnp.float32), encode(jnp.bfloat16)
    assert mean16.dtype == jnp.bfloat16
    chex.assert_trees_all_close(mean16.astype(jnp.float32), mean32, atol=0.1, rtol=0.05)


# ------------------------------------------------------------------------------------------------------------
# 2x2 packing for the transformer
# ------------------------------------------------------------------------------------------------------------


def test_pack_matches_flux_pipeline():
    b, h, w, c = 2, 6, 10, 16  # non-square so a swapped axis shows
    latents = np.random.default_rng(0).standard_normal((b, h, w, c)).astype(np.float32)
    tokens = pack_latents(jnp.asarray(latents))
    expected = FluxPipeline._pack_latents(_to_nchw(latents), b, c, h, w).numpy()
    assert tokens.shape == (b, (h // 2) * (w // 2), 4 * c)
    np.testing.assert_array_equal(np.asarray(tokens), expected)

    vae_scale_factor = 8  # FluxPipeline takes pixel sizes and the VAE factor
    unpacked = FluxPipeline._unpack_latents(torch.from_numpy(expected), h * vae_scale_factor, w * vae_scale_factor,
                                            vae_scale_factor)
    np.testing.assert_array_equal(np.asarray(unpack_latents(jnp.asarray(expected), h, w)), _to_nhwc(unpacked))


def test_pack_unpack_round_trip_exact():
    latents = jnp.asarray(np.random.default_rng(1).standard_normal((3, 4, 8, 5)), jnp.float32)
    np.testing.assert_array_equal(np.asarray(unpack_latents(pack_latents(latents), 4, 8)), np.asarray(latents))


# ------------------------------------------------------------------------------------------------------------
# Errors a user can cause
# ------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def small():
    config = _config(block_out_channels=(8, 16, 16), norm_num_groups=4)
    params = _random_params(config)
    return AutoencoderKL(config), params


def test_error_wrong_image_channels(small):
    model, params = small
    with pytest.raises(ValueError, match=r"NHWC images \[B, H, W, 3\].*\(1, 8, 8, 4\)"):
        model.apply({"params": params}, jnp.zeros((1, 8, 8, 4)), method=model.encode)
    with pytest.raises(ValueError, match="NHWC images"):  # NCHW by mistake
        model.apply({"params": params}, jnp.zeros((1, 3, 8, 8)), method=model.encode)


def test_error_image_size_not_multiple_of_downsampling(small):
    model, params = small
    with pytest.raises(ValueError, match=r"image size 10x8 is not a multiple of the VAE's downsampling factor 4"):
        model.apply({"params": params}, jnp.zeros((1, 10, 8, 3)), method=model.encode)


def test_error_wrong_latent_channels(small):
    model, params = small
    with pytest.raises(ValueError, match=r"latents \[B, h, w, 16\]"):
        model.apply({"params": params}, jnp.zeros((1, 2, 2, 4)), method=model.decode)


def test_error_odd_latent_sizes():
    with pytest.raises(ValueError, match=r"latent size 5x4 must be even"):
        pack_latents(jnp.zeros((1, 5, 4, 16)))
    with pytest.raises(ValueError, match=r"latent size 4x3 must be even"):
        unpack_latents(jnp.zeros((1, 2, 64)), 4, 3)
    with pytest.raises(ValueError, match=r"do not fit a 4x6 latent"):
        unpack_latents(jnp.zeros((1, 4, 64)), 4, 6)


def test_config_errors():
    with pytest.raises(ValueError, match="unknown AutoencoderKL config keys.*'latent_chanels'"):
        VAEConfig.from_config({"latent_chanels": 16})
    with pytest.raises(ValueError, match="only DownEncoderBlock2D"):
        VAEConfig(block_out_channels=(32, 64), down_block_types=("DownEncoderBlock2D", "AttnDownEncoderBlock2D"),
                  up_block_types=("UpDecoderBlock2D",) * 2)
    with pytest.raises(ValueError, match="not multiples of norm_num_groups=32"):
        VAEConfig(block_out_channels=(48,))


def test_config_round_trip():
    config = VAEConfig.from_config(common.vae("paper"))
    raw = config.to_diffusers_config()
    assert raw["block_out_channels"] == [128, 256, 512, 512] and raw["shift_factor"] == 0.1159
    assert VAEConfig.from_config({"_class_name": "AutoencoderKL", **raw}) == config
    with torch.device("meta"):
        TorchAutoencoderKL.from_config(raw)  # diffusers takes every field (its own names)
