"""python -m qk_jax.convert (``qk_jax/convert/__main__.py`` and ``export.py``), run in-process via ``main([...])``.

Tiny random transformers/diffusers models built from the stage-1 ``tiny`` config (fixed seed, every weight
randomised) are ``save_pretrained`` to a temp dir; nothing is downloaded. Import -> export must give back the
original tensors bit for bit; bad folders must fail with an error naming the problem.
"""

import json
import shutil

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from configs import stage1, stage3
from qk_jax.convert import __main__ as cli
from qk_jax.convert.safetensors_io import CheckpointError, SafetensorsReader
from qk_jax.models import saved_model
from qk_jax.models.query_kontext import QueryKontextConfig

torch = pytest.importorskip("torch")
import diffusers  # noqa: E402
import transformers  # noqa: E402

CONFIG = "configs/stage1.py:tiny"
MC = QueryKontextConfig.from_config(stage1.get_config("tiny"))


def _randomise(model, seed):
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            is_norm = p.ndim == 1 and ("norm" in name or "ln_q" in name) and "linear" not in name
            p.copy_(1 + 0.1 * torch.randn_like(p) if is_norm else 0.1 * torch.randn_like(p))
    return model.eval()


def torch_models(seed=0):
    """Random torch models with the stage-1 tiny config's VLM, light MMDiT and VAE."""
    vlm = transformers.Qwen2_5_VLForConditionalGeneration(transformers.Qwen2_5_VLConfig(**MC.vlm.to_hf_config()))
    mmdit = diffusers.FluxTransformer2DModel(**MC.mmdit.to_diffusers_config())
    vae = diffusers.AutoencoderKL(**MC.vae.to_diffusers_config())
    return {name: _randomise(m, seed + i) for i, (name, m) in enumerate(dict(qwen=vlm, mmdit=mmdit, vae=vae).items())}


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf")
    out = {}
    for name, model in torch_models().items():
        model.save_pretrained(root / name)
        out[name] = root / name
    return out


def _tensors(folder, weights_name):
    reader = SafetensorsReader(folder, weights_name)
    return {k: reader.get(k) for k in reader.keys()}


def _import(folders, out, *extra, components=("qwen", "mmdit", "vae")):
    args = ["import", "--config", CONFIG, "--out", str(out), *extra]
    for name in components:
        args += [f"--{name}", str(folders[name])]
    return cli.main(args)


def test_import_then_export_reproduces_every_tensor(folders, tmp_path, capsys):
    assert _import(folders, tmp_path / "ckpt") == 0
    printed = capsys.readouterr().out
    assert "RANDOMLY" not in printed and "connector" in printed and "bytes" in printed
    config, params, meta = saved_model.load_model(tmp_path / "ckpt")
    assert meta["stage"] == 1 and meta["imported"]["connector"] == "random"
    assert params["vlm"]["kontext_queries"].shape == (MC.vlm.num_queries, MC.vlm.text.hidden_size)

    assert cli.main(["export", "--checkpoint", str(tmp_path / "ckpt"), "--out", str(tmp_path / "export")]) == 0
    out = tmp_path / "export"
    for name, sub, weights in (("qwen", "vlm", "model"), ("mmdit", "transformer", "diffusion_pytorch_model"),
                               ("vae", "vae", "diffusion_pytorch_model")):
        original, exported = _tensors(folders[name], weights), _tensors(out / sub, weights)
        assert sorted(exported) == sorted(original), name
        for key, value in original.items():
            np.testing.assert_array_equal(exported[key], value, err_msg=f"{name}: {key}")
    kontext = load_file(out / "kontext.safetensors")
    np.testing.assert_array_equal(kontext["kontext_queries"], params["vlm"]["kontext_queries"])
    np.testing.assert_array_equal(kontext["connector.linear_1.weight"], params["connector"]["linear_1"]["kernel"].T)
    np.testing.assert_array_equal(kontext["connector.linear_2.bias"], params["connector"]["linear_2"]["bias"])
    settings = json.loads((out / "kontext_config.json").read_text())
    assert settings["num_queries"] == MC.vlm.num_queries and settings["conditioning"] == "text_and_queries"
    assert settings["vae"]["scaling_factor"] == MC.vae.scaling_factor
    assert "(0, -r, -c)" in (out / "README.md").read_text()
    # The exported folders load with the reference libraries.
    transformers.Qwen2_5_VLForConditionalGeneration.from_pretrained(out / "vlm")
    diffusers.FluxTransformer2DModel.from_pretrained(out / "transformer")
    diffusers.AutoencoderKL.from_pretrained(out / "vae")


def test_components_not_given_are_random_and_bf16_stays_bf16(folders, tmp_path, capsys):
    """No --mmdit: random (and said so); a VAE folder with a tensor the model lacks: counted as unused."""
    vae = _copy_with(folders["vae"], tmp_path, "diffusion_pytorch_model",
                     lambda t: {**t, "decoder.extra.weight": np.ones(3, np.float32)})
    _import(dict(folders, vae=vae), tmp_path / "ckpt", "--dtype", "bfloat16", components=("qwen", "vae"))
    printed = capsys.readouterr().out
    assert printed.count("RANDOMLY INITIALISED") == 1 and "mmdit     " in printed
    assert "1 tensors of the folder unused, e.g. ['decoder.extra.weight']" in printed
    cli.main(["export", "--checkpoint", str(tmp_path / "ckpt"), "--out", str(tmp_path / "export")])
    for folder, weights in (("vlm", "model"), ("transformer", "diffusion_pytorch_model")):
        assert {str(v.dtype) for v in _tensors(tmp_path / "export" / folder, weights).values()} == {"bfloat16"}
    assert {str(v.dtype) for v in load_file(tmp_path / "export" / "kontext.safetensors").values()} == {"bfloat16"}
    original = _tensors(folders["qwen"], "model")["model.embed_tokens.weight"]
    exported = _tensors(tmp_path / "export" / "vlm", "model")["model.embed_tokens.weight"]
    np.testing.assert_array_equal(exported, original.astype(exported.dtype))


def _copy_with(folder, tmp_path, weights_name, edit):
    """A copy of ``folder`` whose single safetensors file went through ``edit(dict) -> dict``."""
    copy = tmp_path / folder.name
    shutil.copytree(folder, copy)
    path = copy / f"{weights_name}.safetensors"
    save_file(edit(load_file(path)), path, metadata={"format": "pt"})
    return copy


def test_missing_tensor_is_named(folders, tmp_path):
    name = "transformer_blocks.0.attn.to_q.weight"
    broken = _copy_with(folders["mmdit"], tmp_path, "diffusion_pytorch_model",
                        lambda t: {k: v for k, v in t.items() if k != name})
    with pytest.raises(CheckpointError, match=name.replace(".", r"\.")):
        _import(dict(folders, mmdit=broken), tmp_path / "ckpt")


def test_wrong_shape_is_named(folders, tmp_path):
    name = "model.layers.0.mlp.up_proj.weight"
    broken = _copy_with(folders["qwen"], tmp_path, "model", lambda t: {**t, name: t[name][:-1]})
    with pytest.raises(CheckpointError, match=name.replace(".", r"\.")):
        _import(dict(folders, qwen=broken), tmp_path / "ckpt")


def test_wrong_model_type(folders, tmp_path):
    with pytest.raises(CheckpointError, match="model_type"):
        _import(dict(folders, qwen=folders["vae"]), tmp_path / "a")
    with pytest.raises(CheckpointError, match="AutoencoderKL"):
        _import(dict(folders, vae=folders["mmdit"]), tmp_path / "b")


def test_config_mismatch_names_the_field(folders, tmp_path):
    """Stage 3's large tiny MMDiT has 2 double-stream layers; the light head folder has 1."""
    with pytest.raises(CheckpointError, match=r"config\.mmdit\.num_layers"):
        cli.main(["import", "--config", "configs/stage3.py:tiny", "--qwen", str(folders["qwen"]),
                  "--mmdit", str(folders["mmdit"]), "--out", str(tmp_path / "ckpt")])


def test_bad_config_path(tmp_path):
    with pytest.raises(ValueError, match="no file"):
        cli.main(["import", "--config", "configs/nope.py:tiny", "--qwen", str(tmp_path), "--out", str(tmp_path / "o")])


def test_stage3_import_gives_the_mmdit_fresh_adapters(folders, tmp_path, capsys):
    """Stage 3's MMDiT has LoRA: imported weights + fresh adapters (lora_b zero), so the export is the folder."""
    config = stage3.get_config("tiny")
    mmdit_config = QueryKontextConfig.from_config(config).mmdit
    flux = _randomise(diffusers.FluxTransformer2DModel(**mmdit_config.to_diffusers_config()), seed=5)
    flux.save_pretrained(tmp_path / "flux")
    cli.main(["import", "--config", "configs/stage3.py:tiny", "--qwen", str(folders["qwen"]), "--mmdit",
              str(tmp_path / "flux"), "--vae", str(folders["vae"]), "--out", str(tmp_path / "ckpt")])
    assert "leaves fresh" in capsys.readouterr().out
    _, params, _ = saved_model.load_model(tmp_path / "ckpt")
    lora_b = params["mmdit"]["transformer_blocks_0"]["attn"]["to_q"]["lora_b"]
    assert lora_b.shape[0] == config.mmdit.lora.rank and not np.asarray(lora_b).any()
    cli.main(["export", "--checkpoint", str(tmp_path / "ckpt"), "--out", str(tmp_path / "export")])
    original = _tensors(tmp_path / "flux", "diffusion_pytorch_model")
    exported = _tensors(tmp_path / "export" / "transformer", "diffusion_pytorch_model")
    assert sorted(exported) == sorted(original)
    for key, value in original.items():
        np.testing.assert_array_equal(exported[key], value, err_msg=key)
