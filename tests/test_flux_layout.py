"""A FLUX.1-layout MMDiT end to end (``configs/stage2.py:tiny,flux=dev``): a diffusers ``FluxTransformer2DModel``
folder with FLUX.1-dev's shape of things (pooled width 24 != context width 48, more single- than double-stream
blocks, a guidance embedding) is imported as stage 2's MMDiT, trained 2 steps, sampled, exported, and the exported
transformer run by diffusers (``torch_reference``) gives our velocity within 1e-4."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import stage1, stage2
from qk_jax import sampling
from qk_jax.convert import export as export_lib
from qk_jax.models import saved_model
from qk_jax.models.mmdit import MMDiTConfig
from qk_jax.models.query_kontext import QueryKontext, QueryKontextConfig
from qk_jax.pytree import flatten
from qk_jax.training import loop, stages

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
from qk_jax.convert import torch_reference  # noqa: E402

ATOL = 1e-4


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """Stage 1 (random, saved), a random diffusers FLUX-layout folder, stage 2 trained 2 steps from both."""
    root = tmp_path_factory.mktemp("flux")
    config1 = stage1.get_config("tiny,flux=dev")
    model1 = QueryKontext(QueryKontextConfig.from_config(config1))
    saved_model.save_model(root / "stage1" / stages.FINAL, config1, model1.init(jax.random.key(0)),
                           meta=dict(stage=1, step=0))

    config = stage2.get_config("tiny,flux=dev")
    mmdit = MMDiTConfig.from_config(config.mmdit)
    torch.manual_seed(0)
    flux = diffusers.FluxTransformer2DModel(**mmdit.to_diffusers_config())
    flux.save_pretrained(root / "flux")
    config.init_from, config.pretrained.mmdit = str(root / "stage1"), str(root / "flux")
    config.total_steps, config.checkpoint_every = 2, 2
    final = loop.train_stage(config, str(root / "stage2"))
    return root, config, flux, final


def test_the_flux_config_is_flux_shaped():
    config = stage2.get_config("tiny,flux=dev")
    m = config.mmdit
    assert (m.joint_attention_dim, m.pooled_projection_dim, m.guidance_embeds) == (48, 24, True)
    assert m.num_single_layers > m.num_layers > 0
    assert (config.connector.out_features, config.connector.pooled_features) == (48, 24)
    paper = stage2.get_config("flux=schnell").mmdit
    assert (paper.num_layers, paper.num_single_layers, paper.joint_attention_dim, paper.pooled_projection_dim,
            paper.guidance_embeds) == (19, 38, 4096, 768, False)
    # Without pooled_proj the connector would feed the pooled vector at the context width: refused up front.
    config.connector.pooled_features = None
    with pytest.raises(ValueError, match="pooled_features=24"):
        QueryKontextConfig.from_config(config)


def test_flux_weights_import_and_train(run):
    root, config, flux, final = run
    _, params, meta = saved_model.load_model(final)
    assert meta["step"] == 2
    imported = {k: v.detach().numpy() for k, v in flux.state_dict().items()}
    ours = flatten(params["mmdit"])
    # Two Adam steps at lr 1e-3 move each weight by at most ~2e-3: the folder's weights, slightly trained.
    pairs = [(ours["x_embedder/kernel"], imported["x_embedder.weight"].T),
             (ours["time_text_embed/guidance_embedder/linear_1/kernel"],
              imported["time_text_embed.guidance_embedder.linear_1.weight"].T),
             (ours["single_transformer_blocks_1/proj_mlp/kernel"],
              imported["single_transformer_blocks.1.proj_mlp.weight"].T)]
    for got, want in pairs:
        moved = np.abs(np.asarray(got) - want)
        assert 0 < moved.max() < 5e-3
    assert np.asarray(params["connector"]["pooled_proj"]["kernel"]).shape == (48, 24)


def test_a_flux_stage2_samples(run):
    _, _, _, final = run
    sampler = sampling.Sampler.from_checkpoint(final)
    images = sampler.sample([sampling.Request(task="t2i", prompt="a red circle")], steps=2)
    assert images.shape == (1, 32, 32, 3) and images.dtype == np.uint8


def test_the_export_runs_in_diffusers_as_ours(run, tmp_path):
    _, config, _, final = run
    export_lib.export_model(final, tmp_path / "export", log=lambda line: None)
    readme = (tmp_path / "export" / "README.md").read_text()
    assert "connector.pooled_proj.weight` [24, 48]" in readme and "guidance = 1" in readme
    pipe = torch_reference.KontextPipeline.from_exported(tmp_path / "export")
    saved_config, params, _ = saved_model.load_model(final)
    model = QueryKontext(QueryKontextConfig.from_config(saved_config))

    rng = np.random.default_rng(0)
    c = model.config.vlm
    ids = np.concatenate([rng.integers(0, 90, (2, 6)), np.full((2, 1), c.text.bos_token_id)], 1).astype(np.int32)
    mask = np.ones_like(ids)
    mask[1, -2:] = 0
    cond = model.condition(params, ids, mask)
    ref_cond = pipe.condition(torch.from_numpy(ids).long(), torch.from_numpy(mask).long())
    chex.assert_trees_all_close(np.asarray(cond.pooled), ref_cond.pooled.numpy(), atol=ATOL, rtol=0)
    assert cond.pooled.shape == (2, 24)

    h = w = 2
    channels = model.config.mmdit.in_channels
    noisy = rng.standard_normal((2, h * w, channels)).astype(np.float32)
    t = np.array([0.3, 0.8], np.float32)
    ours = np.asarray(model.velocity(params, cond, jnp.asarray(noisy), jnp.asarray(t), (h, w)))
    ref = pipe.velocity(ref_cond, torch.from_numpy(noisy), torch.from_numpy(t), (h, w)).numpy()
    print("velocity max abs err:", np.abs(ours - ref).max(), "scale:", np.abs(ref).max())
    chex.assert_trees_all_close(ours, ref, atol=ATOL, rtol=0)
    # The guidance input matters, so the match above includes the guidance embedding's path.
    other_config = saved_config.copy_and_resolve_references()
    other_config.distilled_guidance = 3.5
    other = QueryKontext(QueryKontextConfig.from_config(other_config))
    assert np.abs(np.asarray(other.velocity(params, cond, jnp.asarray(noisy), jnp.asarray(t), (h, w))) - ref).max() \
        > 100 * ATOL
