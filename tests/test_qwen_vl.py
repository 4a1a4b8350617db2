"""The Qwen2.5-VL model beyond converter parity (``tests/test_hf_qwen_vl.py``): the paper size by
``jax.eval_shape``, configs, the ViT's window layout against transformers, kontext queries, LoRA, the
tensor-parallel forward on 8 fake devices, batched image rows, and the errors a user can cause."""

import dataclasses
import functools
import os
import subprocess
import sys
import textwrap

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import stage1, stage2
from qk_jax.models import qwen_vl as q
from qk_jax.models.lora import lora_params, merge_lora, strip_lora
from qk_jax.pytree import leaf_paths, regex_mask
from conftest import fake_devices_env

PAPER_VLM_PARAMS = 8_292_166_656  # transformers Qwen2_5_VLForConditionalGeneration, meta device (docs/design.md)


def tiny(**overrides):
    """configs' tiny VLM (4x4-patch images are 2x2 merged tokens, 16 px windows hold one) with overrides."""
    return dataclasses.replace(q.QwenVLConfig.from_config(stage1.get_config("tiny").vlm), **overrides)


def inputs(config, grids, samples=((3, 0, 2), (1, 0, 1)), seed=0):
    """Batch whose sample b has text, then the images given by indices in samples[b] (0 = the first grid ...)."""
    rng = np.random.default_rng(seed)
    rows, used = [], []
    for spec in samples:
        row = rng.integers(0, 90, spec[0]).tolist()
        for g in spec[1:-1]:
            row += [config.vision_start_token_id] + [config.image_token_id] * (int(np.prod(grids[g])) // 4)
            row += [config.vision_end_token_id]
            used.append(grids[g])
        row += rng.integers(0, 90, spec[-1]).tolist()
        rows.append(row)
    length = max(map(len, rows))
    ids = np.zeros((len(rows), length), np.int32)
    mask = np.zeros_like(ids)
    for b, row in enumerate(rows):
        ids[b, : len(row)], mask[b, : len(row)] = row, 1
    pixels = rng.standard_normal((sum(int(np.prod(g)) for g in used), config.vision.patch_dim)).astype(np.float32)
    return ids, mask, pixels, tuple(used)


@functools.cache
def _jitted(config, grids, return_logits):
    """The jitted forward per static configuration (eager dispatch of many small ops is slow on CPU)."""
    model = q.QwenVL(config)
    return jax.jit(lambda p, i, m, x: model.apply({"params": p}, i, m, x, grids, return_logits=return_logits))


def init(config, seed=0):
    """Random params of the model's shapes: NumPy draws into ``jax.eval_shape(init)`` (compiling the random
    initialisers takes longer on CPU than the tests themselves; the sharded test runs the real ``init``).
    Norm scales near 1, everything else (adapters included) small and non-zero."""
    rng = np.random.default_rng(seed)
    abstract = nn.meta.unbox(q.abstract_params(config))["params"]
    draw = lambda p, x: (1.0 if p[-1].key == "scale" else 0.0) + 0.08 * rng.standard_normal(x.shape)
    return jax.tree_util.tree_map_with_path(lambda p, x: jnp.asarray(draw(p, x), x.dtype), abstract)


def forward(config, params, ids, mask, pixels, grids, return_logits=False):
    return _jitted(config, grids, return_logits)(params, ids, mask, pixels)


def test_paper_size_by_eval_shape():
    config = q.QwenVLConfig.from_config(stage2.get_config().vlm)
    assert config.num_queries == 128 and config.text.hidden_size == 3584
    without = dataclasses.replace(config, num_queries=0)
    assert q.param_count(without) == PAPER_VLM_PARAMS
    # The kontext queries are one more leaf: K x hidden = 128 x 3584 = 458,752.
    assert q.param_count(config) == PAPER_VLM_PARAMS + 128 * 3584
    assert config.vision.window_size // config.vision.spatial_merge_size // config.vision.patch_size == 4


def test_configs_map_to_transformers_and_back():
    torch = pytest.importorskip("torch")
    import transformers

    config = tiny(num_queries=0, lora=type(tiny().lora)())  # transformers has neither queries nor LoRA
    hf = transformers.Qwen2_5_VLConfig(**config.to_hf_config())
    assert q.QwenVLConfig.from_hf_config(hf.to_dict()) == config
    with torch.device("meta"):
        model = transformers.Qwen2_5_VLForConditionalGeneration(hf)
    assert sum(p.numel() for p in model.parameters()) == q.param_count(config)
    with pytest.raises(ValueError, match="unknown keys"):
        vlm = stage1.get_config("tiny").vlm
        vlm.vision.windowsize = 3
        q.QwenVLConfig.from_config(vlm)
    with pytest.raises(ValueError, match="query_attention"):
        tiny(query_attention="full")


@pytest.mark.parametrize("grids", [[(1, 6, 8), (1, 4, 6), (1, 2, 2)], [(2, 8, 4)], [(1, 16, 12), (1, 8, 8)]])
def test_window_index_matches_transformers(grids):
    torch = pytest.importorskip("torch")
    from transformers.vision_utils import get_vision_window_index

    index, window_id = q.vision_window_index(grids, 2, 32, 8)
    ref_index, ref_cu = get_vision_window_index(torch.tensor(grids), 2, 32, 8)
    np.testing.assert_array_equal(index, ref_index.numpy())
    # Window boundaries in patches: every change of window id, times the 4 patches of a merged token.
    cu = np.concatenate([[0], np.flatnonzero(np.diff(window_id)) + 1, [len(window_id)]]) * 4
    np.testing.assert_array_equal(cu, ref_cu.numpy())
    # The padded blocks that attention runs on hold every patch once, each window in its own block.
    blocks = q.segment_blocks(np.repeat(window_id, 4))
    np.testing.assert_array_equal(blocks.gather.reshape(-1)[blocks.scatter], np.arange(4 * len(window_id)))
    np.testing.assert_array_equal(blocks.valid.sum(1), np.diff(cu))


def test_lora_targets_merge_and_trainable_split():
    vlm = stage1.get_config("tiny").vlm
    config = q.QwenVLConfig.from_config(vlm)
    assert config.lora.rank == 4
    params = init(config)
    adapted = sorted({p.rsplit("/", 2)[0] + "/" + p.rsplit("/", 2)[1] for p in leaf_paths(lora_params(params))})
    want = sorted(f"language_model/layers_{i}/{m}" for i in range(2) for m in
                  ("self_attn/q_proj", "self_attn/k_proj", "self_attn/v_proj", "self_attn/o_proj",
                   "mlp/gate_proj", "mlp/up_proj", "mlp/down_proj"))
    assert adapted == want  # the ViT's blocks_i/mlp/gate_proj is not a target

    # Non-zero adapters (``init`` draws lora_b too): the adapted model equals the merged plain model.
    ids, mask, pixels, grids = inputs(config, [(1, 4, 4), (1, 2, 6)])
    out = forward(config, params, ids, mask, pixels, grids, return_logits=True)
    plain = dataclasses.replace(config, lora=type(config.lora)())
    merged = merge_lora(params, config.lora.alpha)
    ref = forward(plain, merged, ids, mask, pixels, grids, return_logits=True)
    chex.assert_trees_all_close((out.hidden_states, out.logits), (ref.hidden_states, ref.logits), atol=1e-5, rtol=0)
    unmerged = forward(plain, strip_lora(params), ids, mask, pixels, grids, return_logits=True)
    assert np.abs(np.asarray(unmerged.hidden_states - ref.hidden_states)).max() > 1e-3  # the adapters matter

    # Stage 1 trains the adapters and the queries of the VLM, nothing else of it.
    trainable = regex_mask({"vlm": params}, stage1.get_config("tiny").trainable)
    on = sorted(p for p, t in zip(leaf_paths(trainable), jax.tree.leaves(trainable)) if t)
    assert on == sorted(["vlm/kontext_queries"] + [f"vlm/{m}/lora_{ab}" for m in want for ab in "ab"])


def test_query_attention_causal_and_bidirectional():
    config = tiny(num_queries=3, lora=type(tiny().lora)())
    params = init(config)
    ids, mask, pixels, grids = inputs(config, [(1, 4, 4)])
    run = lambda cfg, p: forward(cfg, p, ids, mask, pixels, grids)
    bump = {**params, "kontext_queries": params["kontext_queries"].at[-1].add(1.0)}
    causal, causal_bumped = run(config, params), run(config, bump)
    bi_config = dataclasses.replace(config, query_attention="bidirectional")
    bi, bi_bumped = run(bi_config, params), run(bi_config, bump)
    prompt = np.asarray(causal.text_mask | causal.image_mask)
    h = lambda o: np.asarray(o.hidden_states)
    # The prompt never sees the queries; a causal query does not see later queries, a bidirectional one does.
    chex.assert_trees_all_close(h(bi)[prompt], h(causal)[prompt], atol=1e-6)
    chex.assert_trees_all_close(h(causal_bumped)[:, :-1], h(causal)[:, :-1], atol=1e-6)
    assert np.abs(h(bi_bumped)[:, -3] - h(bi)[:, -3]).max() > 1e-3
    # Query positions continue each sample's prompt (right padding: after the last valid token).
    lengths = mask.sum(1)
    pos = np.asarray(causal.position_ids)
    last = np.asarray([pos[b, lengths[b] - 1].max() for b in range(len(lengths))])
    np.testing.assert_array_equal(pos[:, -3:, 0], last[:, None] + np.arange(1, 4))


def test_image_rows_equal_the_packed_forward():
    """[B_v, N, D] rows (same images per sample) equal the transformers-style packed [B_v*N, D] input."""
    config = tiny(num_queries=2)
    params = init(config)
    grid = (1, 4, 2)
    ids, mask, pixels, grids = inputs(config, [grid], samples=((2, 0, 3), (4, 0, 1)))
    packed = forward(config, params, ids, mask, pixels, grids, return_logits=True)
    rows = pixels.reshape(2, -1, pixels.shape[-1])
    batched = forward(config, params, ids, mask, rows, (grid,), return_logits=True)
    chex.assert_trees_all_close(batched, packed, atol=1e-5, rtol=0)


def test_absent_image_slots_equal_the_packed_present_images():
    """The pipeline's [B, M] image slots with one dropped = transformers-style packing of the present ones."""
    config = tiny(num_queries=2)
    params = init(config)
    grid = (1, 4, 2)
    ids, mask, pixels, _ = inputs(config, [grid], samples=((2, 0, 0, 3), (4, 0, 1)))  # 2 images, then 1
    patches = int(np.prod(grid))
    slots = np.zeros((2, 2 * patches, pixels.shape[-1]), np.float32)  # [B, M * P, D]
    slots[0] = pixels[: 2 * patches]
    slots[1, patches:] = pixels[2 * patches:]  # sample 1: slot 0 dropped (zeros), slot 1 its image
    present = np.array([[True, True], [False, True]])
    packed = forward(config, params, ids, mask, pixels, (grid,) * 3)
    q.check_inputs(config, ids, (grid, grid), slots.shape, present)
    fn = jax.jit(lambda p, i, m, x, pr: q.QwenVL(config).apply({"params": p}, i, m, x, (grid, grid), pr))
    slotted = fn(params, ids, mask, slots, present)
    chex.assert_trees_all_close(slotted, packed, atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="mark them absent"):
        q.check_inputs(config, ids, (grid, grid), slots.shape, np.ones((2, 2), bool))


def test_bf16_compute_runs():
    config = tiny(dtype=jnp.bfloat16)
    params = init(config)
    ids, mask, pixels, grids = inputs(config, [(1, 4, 4)])
    out = forward(config, params, ids, mask, pixels, grids)
    assert out.hidden_states.dtype == jnp.bfloat16 and np.isfinite(np.asarray(out.hidden_states, np.float32)).all()


def test_errors():
    config = tiny()
    params = init(config)
    model = q.QwenVL(config)
    ids, mask, pixels, grids = inputs(config, [(1, 4, 4)])
    extra_pad = ids.copy()
    extra_pad[0, 0] = config.image_token_id
    with pytest.raises(ValueError, match="5 <.image_pad.> tokens .* only 4 features"):
        model.apply({"params": params}, extra_pad[:1], mask[:1], pixels[:16], grids[:1])
    with pytest.raises(ValueError, match="some images have no place"):
        model.apply({"params": params}, ids[:1, :3], mask[:1, :3], pixels[:16], grids[:1])
    big = dataclasses.replace(config, vision=dataclasses.replace(config.vision, max_pixels=32 * 32 - 1))
    with pytest.raises(ValueError, match="32x32 px = 1024 pixels, above the configured budget"):
        q.QwenVL(big).apply({"params": params}, ids[:1], mask[:1], pixels[:16], grids[:1])
    with pytest.raises(ValueError, match="multiples of spatial_merge_size"):
        q.check_inputs(config, None, [(1, 3, 4)])
    with pytest.raises(ValueError, match="pixel_values has shape"):
        model.apply({"params": params}, ids[:1], mask[:1], pixels[:15], grids[:1])
    with pytest.raises(ValueError, match="must be static"):
        jax.jit(lambda g: model.apply({"params": params}, ids[:1], mask[:1], pixels[:16], g))(np.array(grids[:1]))


SHARDED = textwrap.dedent(
    """
    import flax.linen as nn, jax, numpy as np
    from configs import stage1
    from qk_jax.models import qwen_vl as q
    from qk_jax.parallel.mesh import logical_shardings, make_mesh
    import tests.test_qwen_vl as t

    jax.config.update("jax_default_matmul_precision", "highest")
    assert jax.device_count() == 8
    config = stage1.get_config("tiny")
    vlm = q.QwenVLConfig.from_config(config.vlm)
    mesh = make_mesh([("data", 2), ("fsdp", 1), ("tensor", 4)])
    activation_rules = [("batch", ("data", "fsdp")), ("length", None), ("act_embed", None)]
    rules = list(config.sharding.vlm_rules) + activation_rules
    model = q.QwenVL(vlm)
    abstract = jax.eval_shape(lambda k: model.init(k, **q.init_inputs(vlm)), jax.random.key(0))
    shardings = nn.meta.unbox(logical_shardings(abstract, mesh, rules))
    init = jax.jit(lambda k: nn.meta.unbox(model.init(k, **q.init_inputs(vlm))), out_shardings=shardings)
    params = init(jax.random.key(1))
    p = params["params"]["language_model"]["layers_0"]
    P = jax.sharding.PartitionSpec
    assert p["self_attn"]["q_proj"]["kernel"].sharding.spec == P(None, "tensor")
    assert p["self_attn"]["k_proj"]["kernel"].sharding.spec == P(None, "tensor")
    assert p["self_attn"]["o_proj"]["kernel"].sharding.spec == P("tensor", None)
    assert p["mlp"]["down_proj"]["kernel"].sharding.spec == P("tensor", None)
    assert p["mlp"]["gate_proj"]["lora_b"].sharding.spec == P(None, "tensor")
    assert params["params"]["lm_head"]["kernel"].sharding.spec == P(None, "tensor")
    assert params["params"]["language_model"]["embed_tokens"]["embedding"].sharding.spec == P("tensor", None)
    assert p["mlp"]["up_proj"]["kernel"].addressable_shards[0].data.shape == (32, 16)

    ids, mask, pixels, grids = t.inputs(vlm, [(1, 4, 4), (1, 2, 6)])
    fwd = lambda prm, i, m, x: model.apply(prm, i, m, x, grids, return_logits=True)
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        sharded = jax.jit(fwd)(params, ids, mask, pixels)
    ref = jax.jit(fwd)(jax.device_put(jax.device_get(params), jax.devices()[0]), ids, mask, pixels)
    for a, b in [(sharded.hidden_states, ref.hidden_states), (sharded.logits, ref.logits)]:
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5, rtol=0)
    print("ok", float(np.abs(np.asarray(sharded.logits) - np.asarray(ref.logits)).max()))
    """
)


def test_tensor_parallel_forward_on_eight_devices_equals_one():
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    tests = os.path.join(root, "tests")  # the script imports this file, which imports conftest
    env = fake_devices_env(8, PYTHONPATH=os.pathsep.join([root, tests, os.environ.get("PYTHONPATH", "")]))
    out = subprocess.run([sys.executable, "-c", SHARDED], env=env, capture_output=True, text=True, timeout=300,
                         cwd=root)
    assert out.returncode == 0 and "ok" in out.stdout, out.stderr[-3000:]
