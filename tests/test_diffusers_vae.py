"""diffusers AutoencoderKL folders <-> our VAE params: the name table, load, export and their errors."""

import json
import logging
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL as TorchAutoencoderKL
from safetensors.numpy import load_file, save_file

from qk_jax.convert import diffusers_vae
from qk_jax.convert.safetensors_io import CheckpointError
from qk_jax.models.vae import VAEConfig
from qk_jax.pytree import leaf_paths

WEIGHTS = "diffusion_pytorch_model.safetensors"


def _kwargs(quant, layers=1, latent=16):
    return dict(block_out_channels=(32, 64), layers_per_block=layers, norm_num_groups=8, latent_channels=latent,
                down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                use_quant_conv=quant, use_post_quant_conv=quant, scaling_factor=0.3611, shift_factor=0.1159)


def _torch_vae(**kwargs):
    torch.manual_seed(0)
    model = TorchAutoencoderKL(**kwargs).eval()
    with torch.no_grad():  # random vectors too, so a mis-mapped norm or bias shows
        for p in model.parameters():
            if p.ndim == 1:
                p.add_(0.1 * torch.randn_like(p))
    return model


@pytest.fixture(scope="module", params=[False, True], ids=["flux", "quant_convs"])
def saved(request, tmp_path_factory):
    model = _torch_vae(**_kwargs(request.param))
    folder = tmp_path_factory.mktemp("vae")
    model.save_pretrained(folder)
    return model, folder


@pytest.mark.parametrize("quant", [False, True])
def test_name_table_is_diffusers_state_dict(quant):
    """Our table names exactly the tensors of diffusers' model, with their shapes, for both layouts."""
    kwargs = _kwargs(quant, layers=2)
    with torch.device("meta"):
        reference = {k: tuple(v.shape) for k, v in TorchAutoencoderKL(**kwargs).state_dict().items()}
    table = diffusers_vae.name_table(VAEConfig.from_config(kwargs))
    assert {row.theirs: diffusers_vae._their_shape(row) for row in table} == reference
    rows = {row.ours: row.theirs for row in table}
    assert rows["encoder/down_blocks_0/resnets_1/norm1/scale"] == "encoder.down_blocks.0.resnets.1.norm1.weight"
    assert rows["encoder/down_blocks_0/downsamplers_0/conv/kernel"] == (
        "encoder.down_blocks.0.downsamplers.0.conv.weight")
    assert rows["encoder/mid_block/attentions_0/to_out_0/kernel"] == "encoder.mid_block.attentions.0.to_out.0.weight"
    assert rows["decoder/up_blocks_0/upsamplers_0/conv/bias"] == "decoder.up_blocks.0.upsamplers.0.conv.bias"
    assert rows["decoder/up_blocks_1/resnets_0/conv_shortcut/kernel"] == (
        "decoder.up_blocks.1.resnets.0.conv_shortcut.weight")
    assert ("quant_conv/kernel" in rows) == quant and ("post_quant_conv/kernel" in rows) == quant


def test_load_layouts(saved):
    model, folder = saved
    config, params = diffusers_vae.load(folder)
    assert config.latent_channels == 16 and config.shift_factor == 0.1159
    assert config.use_quant_conv == model.config.use_quant_conv
    assert sorted(leaf_paths(params)) == sorted(row.ours for row in diffusers_vae.name_table(config))
    sd = model.state_dict()
    # conv OIHW -> HWIO, linear [out, in] -> [in, out], norms as they are
    np.testing.assert_array_equal(params["encoder"]["conv_in"]["kernel"],
                                  sd["encoder.conv_in.weight"].numpy().transpose(2, 3, 1, 0))
    np.testing.assert_array_equal(params["decoder"]["mid_block"]["attentions_0"]["to_q"]["kernel"],
                                  sd["decoder.mid_block.attentions.0.to_q.weight"].numpy().T)
    np.testing.assert_array_equal(params["encoder"]["conv_norm_out"]["scale"],
                                  sd["encoder.conv_norm_out.weight"].numpy())
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(params))
    _, bf16 = diffusers_vae.load(folder, dtype=jnp.bfloat16)
    assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(bf16))


def test_export_reloads_in_diffusers_exactly(saved, tmp_path):
    model, folder = saved
    config, params = diffusers_vae.load(folder)
    diffusers_vae.export(config, params, tmp_path / "out")
    raw = json.loads((tmp_path / "out" / "config.json").read_text())
    assert raw["_class_name"] == "AutoencoderKL" and "_diffusers_version" in raw
    reloaded = TorchAutoencoderKL.from_pretrained(tmp_path / "out")
    original, again = model.state_dict(), reloaded.state_dict()
    assert original.keys() == again.keys()
    for name in original:
        assert torch.equal(original[name], again[name]), name
    assert VAEConfig.from_config(reloaded.config) == VAEConfig.from_config(model.config) == config


def test_export_refuses_params_of_another_config(saved, tmp_path):
    _, folder = saved
    config, params = diffusers_vae.load(folder)
    del params["decoder"]["conv_out"]
    with pytest.raises(ValueError, match=r"missing \['decoder/conv_out/bias', 'decoder/conv_out/kernel'\]"):
        diffusers_vae.export(config, params, tmp_path / "out")


# ------------------------------------------------------------------------------------------------------------
# Checkpoint errors
# ------------------------------------------------------------------------------------------------------------


def _copy(folder, tmp_path):
    out = tmp_path / "copy"
    shutil.copytree(folder, out)
    return out


def test_error_wrong_model_type(saved, tmp_path):
    _, folder = saved
    out = _copy(folder, tmp_path)
    raw = json.loads((out / "config.json").read_text())
    (out / "config.json").write_text(json.dumps({**raw, "_class_name": "FluxTransformer2DModel"}))
    with pytest.raises(CheckpointError, match=r"_class_name='FluxTransformer2DModel', expected 'AutoencoderKL'"):
        diffusers_vae.load(out)


def test_error_mismatched_shape_names_the_tensor(saved, tmp_path):
    _, folder = saved
    out = _copy(folder, tmp_path)
    tensors = load_file(out / WEIGHTS)
    tensors["decoder.mid_block.attentions.0.to_v.weight"] = np.zeros((64, 32), np.float32)
    save_file(tensors, out / WEIGHTS)
    with pytest.raises(CheckpointError, match=r"'decoder.mid_block.attentions.0.to_v.weight' has shape \(64, 32\)"):
        diffusers_vae.load(out)


def test_error_missing_tensor_and_unused_reported(saved, tmp_path, caplog):
    _, folder = saved
    out = _copy(folder, tmp_path)
    tensors = load_file(out / WEIGHTS)
    tensors["encoder.extra.weight"] = np.zeros((2,), np.float32)
    save_file(tensors, out / WEIGHTS)
    with caplog.at_level(logging.WARNING):
        diffusers_vae.load(out)
    assert "1 tensors not used by the VAE: encoder.extra.weight" in caplog.text

    del tensors["encoder.conv_out.bias"]
    save_file(tensors, out / WEIGHTS)
    with pytest.raises(CheckpointError, match=r"1 tensors the config.json implies are missing: encoder.conv_out.bias"):
        diffusers_vae.load(out)


def test_error_bad_config_names_the_file(saved, tmp_path):
    _, folder = saved
    out = _copy(folder, tmp_path)
    raw = json.loads((out / "config.json").read_text())
    (out / "config.json").write_text(json.dumps({**raw, "norm_num_groups": 7}))
    with pytest.raises(CheckpointError, match=r"config.json: .*not multiples of norm_num_groups=7"):
        diffusers_vae.load(out)
