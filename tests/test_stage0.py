"""Stage 0 (``qk_jax.training.stage0``) at test scale: it trains, exports, stage 1 imports exactly what it trained, the
latent factors normalise, and a finished stage 0 is not rerun."""

import copy
import json
import os

import chex
import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from configs import shapes as shapes_config
from qk_jax.data.processors import processor_for
from qk_jax.models import lora as lora_lib
from qk_jax.models.query_kontext import QueryKontext, QueryKontextConfig
from qk_jax.pytree import flatten
from qk_jax.training import stage0 as stage0_lib
from qk_jax.training import stages


@pytest.fixture(scope="module")
def config():
    return shapes_config.get_config("tiny")


@pytest.fixture(scope="module")
def stage0(tiny_stage0):
    return tiny_stage0  # conftest.py: trained once for this file and test_train's curriculum


def _trained(directory, component):
    """The trainable params of a component's last Orbax checkpoint, read straight from disk."""
    manager = ocp.CheckpointManager(os.path.join(directory, component, "checkpoints"),
                                    item_names=("state", "data", "meta"))
    restored = manager.restore(manager.latest_step(), args=ocp.args.Composite(state=ocp.args.StandardRestore()))
    manager.close()
    return restored.state["trainable"], int(restored.state["step"])


def test_stage0_trains_both_models(config, stage0):
    directory, result = stage0
    vae, vlm = result.figures["vae"], result.figures["vlm"]
    assert vae["after"]["l1"] < vae["before"]["l1"] and vae["after"]["psnr"] > vae["before"]["psnr"]
    assert vlm["after"]["description_loss"] < vlm["before"]["description_loss"]
    assert vlm["after"]["prompt_loss"] < vlm["before"]["prompt_loss"]
    for component in ("vae", "vlm"):
        _, step = _trained(directory, component)
        assert step == config.stage0[component].steps
        with open(os.path.join(directory, component, "metrics.jsonl")) as f:
            losses = [r["loss"] for r in map(json.loads, f) if "loss" in r]
        assert len(losses) == config.stage0[component].steps and np.all(np.isfinite(losses))
    assert os.path.isdir(result.vae) and os.path.isdir(result.vlm)
    with open(os.path.join(result.vae, "config.json")) as f:
        exported = json.load(f)
    assert (exported["scaling_factor"], exported["shift_factor"]) == (result.scaling_factor, result.shift_factor)


def test_stage1_imports_exactly_what_stage0_trained(config, stage0):
    directory, result = stage0
    stage1 = copy.deepcopy(config.stages[0])
    stage1 = stage0_lib.with_stage0(stage1, result, first=True)
    assert (stage1.pretrained.vlm, stage1.pretrained.vae) == (result.vlm, result.vae)
    model = QueryKontext(QueryKontextConfig.from_config(stage1))
    # The path a Qwen2.5-VL / FLUX import takes. (An RBG key: the random init compiles faster than threefry's.)
    params = stages.initial_params(model, stage1, jax.random.key(1, impl="rbg"))

    vae, _ = _trained(directory, "vae")
    chex.assert_trees_all_equal(params["vae"], vae)
    vlm, _ = _trained(directory, "vlm")
    imported = {k: v for k, v in lora_lib.strip_lora(params["vlm"]).items() if k != "kontext_queries"}
    chex.assert_trees_all_equal(imported, vlm)
    assert any(k.endswith("lora_a") for k in flatten(params["vlm"]))  # stage 1's adapters sit beside them

    # The measured normalisation gives held-out latents, as the stages encode them, about zero mean, unit std.
    images = stage0_lib.vae_images(stage0_lib.world_of(config), 7, stage0_lib.EVAL_STREAM + 10, 0, 8)
    z = np.asarray(jax.jit(model.encode)(params, images, jax.random.key(2)))
    assert abs(z.mean()) < 0.25 and 0.7 < z.std() < 1.4, (z.mean(), z.std())

    # Later stages keep stage 1's VAE config: the factors, but not the import.
    stage2 = copy.deepcopy(config.stages[1])
    stage2 = stage0_lib.with_stage0(stage2, result, first=False)
    assert stage2.vae.scaling_factor == result.scaling_factor and not stage2.pretrained.vae
    assert stages.model_signature(stage2, "vae") == stages.model_signature(stage1, "vae")


def test_a_finished_stage0_is_not_rerun(config, stage0, monkeypatch):
    directory, result = stage0
    stamp = os.path.getmtime(os.path.join(directory, stage0_lib.RESULT_FILE))
    for name in ("pretrain_vae", "pretrain_vlm"):
        monkeypatch.setattr(stage0_lib, name, lambda *a, **k: pytest.fail("a finished stage 0 trained again"))
    again = stage0_lib.run(config, directory)
    assert again == result and os.path.getmtime(os.path.join(directory, stage0_lib.RESULT_FILE)) == stamp


def test_rows_follow_the_stage_processor(config):
    stage = config.stages[0]
    world = stage0_lib.world_of(config)
    rows = stage0_lib.make_rows(stage, world, 0, probe=8)
    text, image = stage0_lib._description(world, 0, stage0_lib.EVAL_STREAM, 0, 0)
    row = rows.row(text, image)
    want = processor_for(stage)(f"<image 1> {text}", [image])["input_ids"]
    n = min(len(want), rows.length)
    np.testing.assert_array_equal(row["input_ids"][:n], want[:n])
    # Labels: the description's tokens only, never the image's tokens or the padding.
    labels = row["labels"]
    assert not labels[np.isin(row["input_ids"], rows.special_ids)].any()
    assert labels.sum() == np.sum(~np.isin(want[:n], rows.special_ids))
    text_only = rows.row(text, None)
    assert not text_only["image_present"][0] and not np.any(text_only["pixel_values"])


def test_with_stage0_refuses_to_hide_an_explicit_import(config, stage0):
    _, result = stage0
    stage1 = copy.deepcopy(config.stages[0])
    stage1.pretrained.vlm = "/somewhere/Qwen2.5-VL-7B"
    with pytest.raises(ValueError, match="pretrained.vlm"):
        stage1 = stage0_lib.with_stage0(stage1, result, first=True)
