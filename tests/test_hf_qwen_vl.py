"""Qwen2.5-VL converter and model parity against a tiny random transformers ``Qwen2_5_VLForConditionalGeneration``.

The tiny model has 3 ViT blocks (0 and 2 windowed, 1 full attention) with 32 px windows (2x2 merged tokens)
and images of 48x64, 32x48 and 16x16 px, so windows are engaged, some partial; a 2-layer GQA LLM (4 query,
2 KV heads). float32, matmul precision 'highest' (conftest), max abs error <= 1e-4.
"""

import dataclasses
import functools
import json

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qk_jax.convert import hf_qwen_vl
from qk_jax.convert.safetensors_io import CheckpointError
from qk_jax.models.qwen_vl import QwenVL
from qk_jax.pytree import unflatten

torch = pytest.importorskip("torch")
import transformers  # noqa: E402

IMAGE, VIDEO, START, END = 108, 109, 105, 106
TEXT_VOCAB = 100
GRID_A, GRID_B, GRID_C = (1, 6, 8), (1, 4, 6), (1, 2, 2)
BATCHES = {
    "text_only": [[6], [9]],
    "one_image": [[3, GRID_A, 4]],
    "0_1_2_images": [[6], [3, GRID_A, 4], [GRID_B, 2, GRID_C, 3]],
}
ATOL = 1e-4


def hf_config():
    return transformers.Qwen2_5_VLConfig(
        vision_config=dict(depth=3, hidden_size=32, num_heads=2, intermediate_size=48, patch_size=8, window_size=32,
                           fullatt_block_indexes=[1], out_hidden_size=64, spatial_merge_size=2, temporal_patch_size=2,
                           in_channels=3, tokens_per_second=2),
        text_config=dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-6, max_position_embeddings=512,
                         rope_parameters=dict(rope_type="default", rope_theta=1e6, mrope_section=[2, 3, 3]),
                         bos_token_id=100, eos_token_id=102),
        image_token_id=IMAGE, video_token_id=VIDEO, vision_start_token_id=START, vision_end_token_id=END)


def tiny_torch_model(seed=0):
    torch.manual_seed(seed)
    model = transformers.Qwen2_5_VLForConditionalGeneration(hf_config()).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            is_norm = "norm" in name or "ln_q" in name
            p.copy_(1 + 0.1 * torch.randn_like(p) if is_norm else 0.08 * torch.randn_like(p))
    return model


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    folder = tmp_path_factory.mktemp("qwen_vl_tiny")
    model = tiny_torch_model()
    model.save_pretrained(folder)
    return model, folder


@pytest.fixture(scope="module")
def loaded(saved):
    return hf_qwen_vl.load(saved[1])


def make_batch(samples, padding_side, patch_dim, seed=0):
    """input_ids/attention_mask [B, S] (one image pad per merged token), packed pixel_values and grids."""
    rng = np.random.default_rng(seed)
    rows, grids = [], []
    for items in samples:
        ids = []
        for item in items:
            if isinstance(item, int):
                ids += rng.integers(0, TEXT_VOCAB, item).tolist()
            else:
                ids += [START] + [IMAGE] * (np.prod(item) // 4) + [END]
                grids.append(item)
        rows.append(ids)
    length = max(map(len, rows)) + 1
    input_ids = np.zeros((len(rows), length), np.int64)
    mask = np.zeros_like(input_ids)
    for b, row in enumerate(rows):
        sl = slice(length - len(row), None) if padding_side == "left" else slice(0, len(row))
        input_ids[b, sl], mask[b, sl] = row, 1
    n_patches = sum(int(np.prod(g)) for g in grids)
    pixels = rng.standard_normal((n_patches, patch_dim)).astype(np.float32) if grids else None
    return input_ids, mask, pixels, tuple(grids)


def torch_forward(model, input_ids, mask, pixels, grids):
    kwargs = dict(input_ids=torch.from_numpy(input_ids), attention_mask=torch.from_numpy(mask),
                  mm_token_type_ids=torch.from_numpy((input_ids == IMAGE).astype(np.int32)))
    if grids:
        kwargs.update(pixel_values=torch.from_numpy(pixels), image_grid_thw=torch.tensor(grids))
    with torch.no_grad():
        hidden = model.model(**kwargs).last_hidden_state.numpy()
        logits = model(**kwargs).logits.numpy()
    return hidden, logits


@functools.cache
def forward(config, grids):
    """Our jitted forward with logits (the grids are static)."""
    return jax.jit(lambda p, i, m, x: QwenVL(config).apply({"params": p}, i, m, x, grids, return_logits=True))


@pytest.mark.parametrize("padding_side", ["left", "right"])
@pytest.mark.parametrize("name", list(BATCHES))
def test_forward_matches_transformers(saved, loaded, name, padding_side):
    model, _ = saved
    config, params = loaded
    input_ids, mask, pixels, grids = make_batch(BATCHES[name], padding_side, config.vision.patch_dim)
    ref_hidden, ref_logits = torch_forward(model, input_ids, mask, pixels, grids)

    out = forward(config, grids or None)(params, input_ids, mask, pixels)
    valid = mask.astype(bool)
    chex.assert_trees_all_close(np.asarray(out.hidden_states)[valid], ref_hidden[valid], atol=ATOL, rtol=0)
    chex.assert_trees_all_close(np.asarray(out.logits)[valid], ref_logits[valid], atol=ATOL, rtol=0)
    np.testing.assert_array_equal(np.asarray(out.image_mask), valid & (input_ids == IMAGE))
    np.testing.assert_array_equal(np.asarray(out.text_mask), valid & (input_ids != IMAGE))


def test_kontext_queries_match_transformers_with_appended_embeddings(saved, loaded):
    """K causal queries = K extra text tokens whose embeddings are the queries (transformers on inputs_embeds)."""
    model, _ = saved
    config, params = loaded
    k = 3
    config = dataclasses.replace(config, num_queries=k)
    queries = np.random.default_rng(5).standard_normal((k, config.text.hidden_size)).astype(np.float32)
    input_ids, mask, pixels, grids = make_batch(BATCHES["0_1_2_images"], "right", config.vision.patch_dim)
    out = QwenVL(config).apply({"params": {**params, "kontext_queries": queries}}, input_ids, mask, pixels, grids)

    batch = input_ids.shape[0]
    ids_ext = np.concatenate([input_ids, np.zeros((batch, k), np.int64)], axis=1)  # text-typed placeholders
    mask_ext = np.concatenate([mask, np.ones((batch, k), np.int64)], axis=1)
    with torch.no_grad():
        inner = model.model
        embeds = inner.get_input_embeddings()(torch.from_numpy(input_ids))
        feats = torch.cat(inner.get_image_features(torch.from_numpy(pixels), torch.tensor(grids)).pooler_output)
        image_mask, _ = inner.get_placeholder_mask(torch.from_numpy(input_ids), embeds, image_features=feats)
        embeds = embeds.masked_scatter(image_mask, feats)
        embeds = torch.cat([embeds, torch.from_numpy(queries)[None].expand(batch, k, -1)], dim=1)
        ids_t = torch.from_numpy(ids_ext)
        pos, _ = inner.get_rope_index(ids_t, mm_token_type_ids=(ids_t == IMAGE).int(),
                                      image_grid_thw=torch.tensor(grids),
                                      attention_mask=torch.from_numpy(mask_ext))
        ref = inner.language_model(inputs_embeds=embeds, attention_mask=torch.from_numpy(mask_ext),
                                   position_ids=pos).last_hidden_state.numpy()
    valid = mask_ext.astype(bool)
    chex.assert_trees_all_close(np.asarray(out.hidden_states)[valid], ref[valid], atol=ATOL, rtol=0)
    np.testing.assert_array_equal(np.asarray(out.position_ids), pos.permute(1, 2, 0).numpy())
    assert np.asarray(out.query_mask)[:, -k:].all() and not np.asarray(out.query_mask)[:, :-k].any()


def test_export_round_trips_through_from_pretrained(saved, loaded, tmp_path):
    model, _ = saved
    config, params = loaded
    hf_qwen_vl.export(config, params, tmp_path / "out")
    reloaded = transformers.Qwen2_5_VLForConditionalGeneration.from_pretrained(tmp_path / "out")
    ref, got = model.state_dict(), reloaded.state_dict()
    assert sorted(ref) == sorted(got)
    for name in ref:
        assert ref[name].dtype == got[name].dtype, name
        np.testing.assert_array_equal(got[name].numpy(), ref[name].numpy(), err_msg=name)
    assert reloaded.config.vision_config.fullatt_block_indexes == [1]


def test_load_sharded_and_v5_names_and_bf16(saved, loaded, tmp_path):
    model, _ = saved
    config, params = loaded
    model.save_pretrained(tmp_path / "sharded", max_shard_size="50KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").is_file()
    _, sharded = hf_qwen_vl.load(tmp_path / "sharded")
    chex.assert_trees_all_equal(sharded, params)

    # The same tensors under transformers v5's in-memory names (model.visual.*, model.language_model.*).
    from safetensors.numpy import save_file

    (tmp_path / "v5").mkdir()
    (tmp_path / "v5" / "config.json").write_text((saved[1] / "config.json").read_text())
    save_file({k: v.numpy() for k, v in model.state_dict().items()}, tmp_path / "v5" / "model.safetensors")
    chex.assert_trees_all_equal(hf_qwen_vl.load(tmp_path / "v5")[1], params)

    _, bf16 = hf_qwen_vl.load(saved[1], dtype=jnp.bfloat16)
    assert jax.tree.leaves(bf16)[0].dtype == jnp.bfloat16


def test_not_a_qwen25_vl_folder(saved, tmp_path):
    cfg = json.loads((saved[1] / "config.json").read_text())
    (tmp_path / "qwen2_vl").mkdir()
    (tmp_path / "qwen2_vl" / "config.json").write_text(json.dumps({**cfg, "model_type": "qwen2_vl"}))
    with pytest.raises(CheckpointError, match="model_type='qwen2_vl', not 'qwen2_5_vl'"):
        hf_qwen_vl.load(tmp_path / "qwen2_vl")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="no config.json"):
        hf_qwen_vl.load(tmp_path / "empty")
    # Right model type, wrong weights: an extra tensor and a wrong shape are both named.
    from safetensors.numpy import save_file

    model, folder = saved
    tensors = {k: v.numpy() for k, v in model.state_dict().items()}
    (tmp_path / "extra").mkdir()
    (tmp_path / "extra" / "config.json").write_text((folder / "config.json").read_text())
    save_file({**tensors, "model.mm_projector.weight": np.zeros(3, np.float32)},
              tmp_path / "extra" / "model.safetensors")
    with pytest.raises(CheckpointError, match="mm_projector"):
        hf_qwen_vl.load(tmp_path / "extra")
    cfg["text_config"]["intermediate_size"] = 80
    (tmp_path / "extra" / "config.json").write_text(json.dumps(cfg))
    save_file(tensors, tmp_path / "extra" / "model.safetensors")
    with pytest.raises(CheckpointError, match="gate_proj"):
        hf_qwen_vl.load(tmp_path / "extra")


def test_export_merges_lora_and_leaves_out_the_queries(loaded, tmp_path):
    from qk_jax.models.lora import LoRAConfig, merge_lora

    config, params = loaded
    config = dataclasses.replace(config, num_queries=2, lora=LoRAConfig(2, 4.0, (r"layers_0/self_attn/q_proj$",)))
    rng = np.random.default_rng(0)
    q_proj = params["language_model"]["layers_0"]["self_attn"]["q_proj"]
    adapted = {**q_proj, "lora_a": rng.standard_normal((64, 2)).astype(np.float32),
               "lora_b": rng.standard_normal((2, 64)).astype(np.float32)}
    layer = {**params["language_model"]["layers_0"], "self_attn": {
        **params["language_model"]["layers_0"]["self_attn"], "q_proj": adapted}}
    trained = {**params, "language_model": {**params["language_model"], "layers_0": layer},
               "kontext_queries": np.ones((2, 64), np.float32)}
    hf_qwen_vl.export(config, trained, tmp_path / "out")
    _, back = hf_qwen_vl.load(tmp_path / "out")
    want = merge_lora({k: v for k, v in trained.items() if k != "kontext_queries"}, 4.0)
    chex.assert_trees_all_close(back, want, atol=1e-6, rtol=0)
    assert np.abs(back["language_model"]["layers_0"]["self_attn"]["q_proj"]["kernel"] - q_proj["kernel"]).max() > 0.1


def test_load_with_place_holds_one_tensor_at_a_time(saved, loaded, tmp_path):
    """``load(place=...)`` hands each tensor on as it is converted: whatever the file count, the host never holds
    more than the tensor in hand (+ the reader's small change), where keeping them (``place`` returning the
    array, what ``load`` does by default) grows to the whole model. Values and order are those of ``load``."""
    import tracemalloc

    from conftest import host_bytes_held

    model, _ = saved
    model.save_pretrained(tmp_path / "sharded", max_shard_size="50KB")
    whole = sum(x.nbytes for x in jax.tree.leaves(loaded[1]))
    held = {}
    for mode in ("stream", "keep"):
        seen, received = [], {}

        def place(path, array, mode=mode, seen=seen, received=received):
            seen.append(host_bytes_held("*/qk_jax/convert/*") - array.nbytes)  # besides the tensor in hand
            received[path] = np.array(array)
            return jax.ShapeDtypeStruct(array.shape, array.dtype) if mode == "stream" else array

        tracemalloc.start()
        try:
            hf_qwen_vl.load(tmp_path / "sharded", place=place)
        finally:
            tracemalloc.stop()
        held[mode] = max(seen[1:])  # the first call also pays the loader's one-time tables
        chex.assert_trees_all_equal(unflatten(received), loaded[1])
    assert held["stream"] < whole / 4 and held["keep"] > 0.7 * whole, (held, whole)
