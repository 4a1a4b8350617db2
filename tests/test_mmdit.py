"""The MMDiT on its own: paper sizes (eval_shape), target-only output, padding masks, LoRA, remat, bf16, FSDP.

Parity with diffusers' FluxTransformer2DModel is in tests/test_diffusers_mmdit.py.
"""

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

from configs import common, stage1, stage2, stage3
from qk_jax.models.lora import LoRAConfig, merge_lora, strip_lora
from qk_jax.models.mmdit import (MMDiT, MMDiTConfig, abstract_params, param_count, sincos_pos_embed, stack_layers,
                                 unstack_layers, with_layout)
from qk_jax.ops import rope
from qk_jax.pytree import leaf_paths
from conftest import fake_devices_env

CFG = MMDiTConfig.from_config(stage3.get_config("tiny").mmdit)  # 2 double + 1 single block, 2 heads x 16
H = W = 2  # latent grid in tokens
L = 4  # text tokens


def test_paper_param_counts():
    """Stage 2's large MMDiT: 9,952,604,736 (diffusers' count, docs/design.md); stage 1's light head: 867,713,600."""
    assert param_count(MMDiTConfig.from_config(stage2.get_config().mmdit)) == 9_952_604_736
    light = MMDiTConfig.from_config(stage1.get_config().mmdit)
    assert (light.num_layers, light.num_attention_heads, light.attention_head_dim) == (10, 24, 64)
    assert param_count(light) == 867_713_600


def test_every_param_has_logical_axes():
    boxed = abstract_params(CFG, LoRAConfig(2, 2.0, common.MMDIT_LORA_TARGETS))
    leaves = jax.tree.leaves(boxed, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))
    for path, leaf in zip(leaf_paths(nn.meta.unbox(boxed)), leaves):
        assert isinstance(leaf, nn.LogicallyPartitioned), path
        assert len(leaf.names) == leaf.value.ndim and set(leaf.names) <= set(common.PARAM_AXES), (path, leaf.names)
    names = {p: leaf.names for p, leaf in zip(leaf_paths(nn.meta.unbox(boxed)), leaves)}
    assert names["transformer_blocks_0/attn/to_q/kernel"] == ("embed", "heads")
    assert names["transformer_blocks_0/attn/to_out_0/kernel"] == ("heads", "embed")
    assert names["transformer_blocks_0/ff/net_0/proj/kernel"] == ("embed", "mlp")
    assert names["transformer_blocks_0/attn/norm_q/scale"] == ("norm",)


def _inputs(roles, seed=0, text_len=L):
    """Random inputs for a batch whose in-context slots have ``roles`` ``[B, M]``, in sequence order."""
    layout = rope.in_context_layout(H, W, jnp.asarray(roles))
    batch, tokens = layout.kind.shape
    rng = np.random.default_rng(seed)
    f32 = lambda *s: rng.standard_normal(s).astype(np.float32)
    inputs = dict(
        hidden_states=f32(batch, tokens, CFG.in_channels), img_ids=layout.ids,
        encoder_hidden_states=f32(batch, text_len, CFG.joint_attention_dim), txt_ids=rope.text_position_ids(text_len),
        timestep=rng.uniform(size=batch).astype(np.float32), pooled_projections=f32(batch, CFG.pooled_projection_dim))
    return inputs, layout


@functools.lru_cache(maxsize=None)
def _apply(model):
    return jax.jit(model.apply, static_argnames=("target_len",))


@pytest.fixture(scope="module")
def params():
    inputs, _ = _inputs([[rope.SOURCE], [rope.REFERENCE]])
    return nn.meta.unbox(jax.jit(MMDiT(CFG).init)(jax.random.key(0), **inputs))["params"]


def test_target_only_output_is_the_slice_of_the_full_output(params):
    """An edit sample [src, noise] and a custom sample [noise, ref]: targets start at token 4 and 0."""
    inputs, layout = _inputs([[rope.SOURCE], [rope.REFERENCE]])
    target_start = jnp.argmax(layout.kind == rope.KIND_TARGET, axis=1).astype(jnp.int32)
    np.testing.assert_array_equal(target_start, [H * W, 0])
    full = _apply(MMDiT(CFG))({"params": params}, **inputs)
    assert full.shape == (2, 2 * H * W, CFG.output_dim)
    target = _apply(MMDiT(CFG))({"params": params}, **inputs, target_start=target_start, target_len=H * W)
    assert target.shape == (2, H * W, CFG.output_dim)
    chex.assert_trees_all_close(target, jnp.stack([full[0, 4:8], full[1, 0:4]]), atol=1e-6)


def test_masked_tokens_do_not_affect_the_target(params):
    """An empty in-context slot and padded text tokens, masked out: their values do not reach the target."""
    inputs, layout = _inputs([[rope.SOURCE, rope.NONE], [rope.REFERENCE, rope.NONE]], text_len=6)
    image_mask = layout.kind != rope.KIND_PAD
    text_mask = np.array([[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 0]], bool)
    target_start = jnp.argmax(layout.kind == rope.KIND_TARGET, axis=1).astype(jnp.int32)
    run = lambda x: _apply(MMDiT(CFG))({"params": params}, **x, text_mask=text_mask, image_mask=image_mask,
                                       target_start=target_start, target_len=H * W)
    poked = dict(inputs)
    poked["hidden_states"] = np.where(image_mask[..., None], inputs["hidden_states"], 50.0).astype(np.float32)
    poked["encoder_hidden_states"] = np.where(text_mask[..., None], inputs["encoder_hidden_states"], -50.0).astype(
        np.float32)
    chex.assert_trees_all_close(run(poked), run(inputs), atol=1e-6)
    # Without the masks the same change does move the target (so the check above can fail).
    unmasked = lambda x: _apply(MMDiT(CFG))({"params": params}, **x, target_start=target_start, target_len=H * W)
    assert np.abs(unmasked(poked) - unmasked(inputs)).max() > 1e-2


def test_lora_targets_and_merge(params):
    """Stage-3-like adapters sit exactly on the attention and FFN projections; merged == unmerged."""
    lora = LoRAConfig(rank=4, alpha=4.0, targets=common.MMDIT_LORA_TARGETS)
    inputs, _ = _inputs([[rope.SOURCE], [rope.REFERENCE]])
    lora_params = nn.meta.unbox(jax.jit(MMDiT(CFG, lora=lora).init)(jax.random.key(0), **inputs))["params"]
    adapted = {p.rsplit("/", 1)[0] for p in leaf_paths(lora_params) if p.endswith("lora_a")}
    double = [f"attn/{n}" for n in ("to_q", "to_k", "to_v", "to_out_0", "add_q_proj", "add_k_proj", "add_v_proj",
                                    "to_add_out")] + ["ff/net_0/proj", "ff/net_2", "ff_context/net_0/proj",
                                                      "ff_context/net_2"]
    expected = {f"transformer_blocks_{i}/{m}" for i in range(CFG.num_layers) for m in double}
    expected |= {f"single_transformer_blocks_{i}/attn/{n}" for i in range(CFG.num_single_layers)
                 for n in ("to_q", "to_k", "to_v")}
    assert adapted == expected

    rng = np.random.default_rng(1)
    lora_params = jax.tree_util.tree_map_with_path(
        lambda p, a: 0.1 * rng.standard_normal(a.shape).astype(np.float32) if p[-1].key == "lora_b" else a,
        lora_params)
    unmerged = _apply(MMDiT(CFG, lora=lora))({"params": lora_params}, **inputs)
    merged = _apply(MMDiT(CFG))({"params": merge_lora(lora_params, lora.alpha)}, **inputs)
    chex.assert_trees_all_close(unmerged, merged, atol=1e-5)
    base = _apply(MMDiT(CFG))({"params": strip_lora(lora_params)}, **inputs)
    assert np.abs(unmerged - base).max() > 1e-3  # the randomised adapters do change the output


@pytest.mark.parametrize("policy", ["full", "attention"])
def test_remat_gives_the_same_values_and_gradients(policy):
    cfg = dataclasses.replace(CFG, num_layers=1)  # one block of each kind keeps the two backward compiles short
    inputs, _ = _inputs([[rope.SOURCE], [rope.REFERENCE]])
    params = nn.meta.unbox(jax.jit(MMDiT(cfg).init)(jax.random.key(0), **inputs))["params"]

    def loss(model, p):
        return jnp.mean(jnp.square(model.apply({"params": p}, **inputs)))

    def value_and_grad(remat):
        fn = jax.value_and_grad(functools.partial(loss, MMDiT(cfg, remat=remat)))
        return jax.jit(fn)(params), jax.jit(fn).lower(params).as_text()

    (value, grads), plain = value_and_grad("none")
    (value_r, grads_r), rematted = value_and_grad(policy)
    chex.assert_trees_all_close((value_r, grads_r), (value, grads), atol=1e-5)
    # The policy really recomputes: the rematerialised program has more matmuls than the plain one.
    assert rematted.count("dot_general") > plain.count("dot_general")


def test_scan_layers_equals_the_per_layer_model(params):
    """One scanned block per stack (with remat, as on a pod) = the unrolled layers: outputs and gradients, with
    params moved between the layouts by stack_layers/unstack_layers; the stacked leaves carry a 'layers' axis."""
    inputs, _ = _inputs([[rope.SOURCE], [rope.REFERENCE]])
    scanned = MMDiT(CFG, scan_layers=True, remat="full")
    boxed = jax.eval_shape(lambda: scanned.init(jax.random.key(0), **inputs))["params"]
    assert boxed["transformer_blocks"]["attn"]["to_q"]["kernel"].names == ("layers", "embed", "heads")
    stacked = stack_layers(params, CFG)
    assert sorted(k for k in stacked if "blocks" in k) == ["single_transformer_blocks", "transformer_blocks"]
    chex.assert_trees_all_equal_shapes_and_dtypes(stacked, nn.meta.unbox(boxed))
    chex.assert_trees_all_equal(unstack_layers(stacked, CFG), params)

    def loss(model, p):
        return jnp.mean(jnp.square(model.apply({"params": p}, **inputs)))

    value, grads = jax.jit(jax.value_and_grad(functools.partial(loss, MMDiT(CFG))))(params)
    value_s, grads_s = jax.jit(jax.value_and_grad(functools.partial(loss, scanned)))(stacked)
    chex.assert_trees_all_close((value_s, unstack_layers(grads_s, CFG)), (value, grads), atol=1e-5)
    chex.assert_trees_all_equal(with_layout(stacked, CFG, False), params)
    chex.assert_trees_all_equal(with_layout(stacked, CFG, True), stacked)


def test_adaln_zero_starts_every_block_as_the_identity():
    """DiT's adaLN-Zero: modulation linears and proj_out start at zero, so the velocity is zero; gradients reach
    the modulations (the gates open) and nothing else of the init changes."""
    inputs, _ = _inputs([[rope.SOURCE], [rope.REFERENCE]])
    zero = nn.meta.unbox(jax.jit(MMDiT(CFG, adaln_zero=True).init)(jax.random.key(0), **inputs))["params"]
    plain = nn.meta.unbox(jax.jit(MMDiT(CFG).init)(jax.random.key(0), **inputs))["params"]
    zeroed = [p for p in leaf_paths(zero) if "norm1" in p or "/norm/" in p or p.startswith(("norm_out", "proj_out"))]
    zeroed = [p for p in zeroed if not p.endswith("scale")]  # the attention's RMSNorm scales stay ones
    assert len(zeroed) == 4 * CFG.num_layers + 2 * CFG.num_single_layers + 4, zeroed
    flat_zero, flat_plain = dict(zip(leaf_paths(zero), jax.tree.leaves(zero))), dict(
        zip(leaf_paths(plain), jax.tree.leaves(plain)))
    for path, leaf in flat_zero.items():
        if path in zeroed:
            assert not np.any(np.asarray(leaf)), path
        else:
            np.testing.assert_array_equal(leaf, flat_plain[path], err_msg=path)
    model = MMDiT(CFG, adaln_zero=True)
    np.testing.assert_array_equal(_apply(model)({"params": zero}, **inputs), 0.0)
    def loss(p):
        v = model.apply({"params": p}, **inputs)
        return jnp.sum(v**2 + v)

    grads = jax.jit(jax.grad(loss))(zero)
    assert np.any(np.asarray(grads["proj_out"]["kernel"]))


def test_unknown_remat_policy_is_refused():
    with pytest.raises(ValueError, match="remat policy 'everything'"):
        MMDiT(dataclasses.replace(CFG, num_layers=1), remat="everything").init(
            jax.random.key(0), **_inputs([[rope.SOURCE], [rope.REFERENCE]])[0])


def test_sincos_pos_embed_is_an_input_embedding(params):
    """``pos_embed='sincos'`` adds the embedding of each token's ids after ``x_embedder``: the same as a plain model
    whose inputs carry the embedding as extra channels, mapped through an identity block of the kernel."""
    inputs, layout = _inputs([[rope.SOURCE], [rope.REFERENCE]])
    pos_cfg = dataclasses.replace(CFG, pos_embed="sincos")
    out = _apply(MMDiT(pos_cfg))({"params": params}, **inputs)

    wide_cfg = dataclasses.replace(CFG, in_channels=CFG.in_channels + CFG.inner_dim, out_channels=CFG.in_channels)
    wide = dict(params, x_embedder=dict(params["x_embedder"], kernel=jnp.concatenate(
        [params["x_embedder"]["kernel"], jnp.eye(CFG.inner_dim)], axis=0)))
    pos = sincos_pos_embed(jnp.asarray(layout.ids), CFG.inner_dim)
    wide_inputs = dict(inputs, hidden_states=jnp.concatenate([inputs["hidden_states"], pos], axis=-1))
    chex.assert_trees_all_close(out, _apply(MMDiT(wide_cfg))({"params": params | wide}, **wide_inputs), atol=1e-5)
    # It carries position: the plain model's output differs.
    assert float(jnp.abs(out - _apply(MMDiT(CFG))({"params": params}, **inputs)).max()) > 1e-2
    with pytest.raises(ValueError, match="pos_embed must be one of"):
        dataclasses.replace(CFG, pos_embed="learned")


def test_bf16_compute_keeps_fp32_params(params):
    inputs, _ = _inputs([[rope.SOURCE], [rope.REFERENCE]])
    model = MMDiT(CFG, dtype=jnp.bfloat16)
    assert all(a.dtype == jnp.float32 for a in jax.tree.leaves(jax.eval_shape(
        lambda: model.init(jax.random.key(0), **inputs))))
    out = _apply(model)({"params": params}, **inputs)
    ref = _apply(MMDiT(CFG))({"params": params}, **inputs)
    assert out.dtype == jnp.bfloat16
    assert np.abs(np.asarray(out, np.float32) - ref).max() < 0.05 * np.abs(ref).max()


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_modulate_and_its_vjp_match_torch_layer_norm(dtype):
    """``modulate``'s hand-written VJP against torch autograd (float64) of diffusers' AdaLayerNormZero formula,
    ``F.layer_norm(x, eps=1e-6) * (1 + scale) + shift``."""
    torch = pytest.importorskip("torch")
    from qk_jax.models.mmdit import modulate

    rng = np.random.default_rng(3)
    x, g = (rng.standard_normal((2, 5, 32)) * 2 + 0.5 for _ in range(2))
    shift, scale = (rng.standard_normal((2, 32)) * 0.3 for _ in range(2))
    args = [jnp.asarray(a, dtype) for a in (x, shift, scale)]
    y, vjp = jax.vjp(modulate, *args)
    grads = vjp(jnp.asarray(g, dtype))

    t = [torch.tensor(np.asarray(a, np.float64), requires_grad=True) for a in args]  # the rounded inputs
    ref = torch.nn.functional.layer_norm(t[0], (32,), eps=1e-6) * (1 + t[2][:, None]) + t[1][:, None]
    ref.backward(torch.tensor(np.asarray(jnp.asarray(g, dtype), np.float64)))
    tol = dict(rtol=1e-4, atol=1e-4) if dtype == jnp.float32 else dict(rtol=2e-2, atol=5e-2)
    assert y.dtype == dtype and all(d.dtype == dtype for d in grads)
    chex.assert_trees_all_close(np.asarray(y, np.float64), ref.detach().numpy(), **tol)
    for ours, theirs in zip(grads, t):
        chex.assert_trees_all_close(np.asarray(ours, np.float64), theirs.grad.numpy(), **tol)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_modulates_vjp_compiles_to_less_than_autodiff(dtype, monkeypatch):
    """The hand-written VJP's effect, held on the compiled gradient of the tiny MMDiT as figures a CPU shows
    (``benchmark.compiled_cost``): fewer fusions, fewer bytes accessed and fewer temporaries than JAX's autodiff
    of the same formula. 2026-12-04, float32: 514 / 550 fusions, 28.6 / 34.1 MB (autodiff's LayerNorm backward
    recomputed in each consumer), 2.20 / 2.29 MB temporaries; bfloat16: 891 / 927, 28.2 / 28.7 MB, 2.43 / 2.52 MB.
    Relative, as absolute figures move with every XLA release."""
    from configs import stage2
    from qk_jax.models import mmdit
    from qk_jax.perf import benchmark

    config = stage2.get_config("tiny")
    config.compute_dtype = dtype
    cfg, model = benchmark._mmdit(config)
    data = {k: jnp.asarray(v) for k, v in benchmark.mmdit_inputs(cfg, benchmark.Shape(2, 64, 16)).items()}
    target = data.pop("target")
    abstract = nn.meta.unbox(jax.eval_shape(model.init, jax.random.key(0), **data))["params"]

    def compiled():
        loss = lambda p: jnp.mean(jnp.square(model.apply({"params": p}, **data).astype(jnp.float32) - target))  # noqa: E731
        program = jax.jit(jax.grad(loss)).lower(abstract).compile()
        return dict(benchmark.compiled_cost(program), temp=program.memory_analysis().temp_size_in_bytes)

    def autodiff_modulate(x, shift, scale):
        xf = x.astype(jnp.float32)
        mean = jnp.mean(xf, axis=-1, keepdims=True)
        xhat = (xf - mean) * jax.lax.rsqrt(jnp.mean(jnp.square(xf - mean), axis=-1, keepdims=True) + 1e-6)
        return (xhat * (1 + scale.astype(jnp.float32)[:, None]) + shift.astype(jnp.float32)[:, None]).astype(x.dtype)

    ours = compiled()
    monkeypatch.setattr(mmdit, "modulate", autodiff_modulate)
    theirs = compiled()
    assert all(ours[k] < theirs[k] for k in ("fusions", "bytes_accessed", "temp")), (ours, theirs)


def test_fp8_reaches_the_block_projections_only(params, monkeypatch):
    """``fp8=True``: each double block's 12 projections (q/k/v and out per stream, two FFN linears per stream)
    and each single block's 5 (q/k/v, proj_mlp, proj_out) go through ``fp8_matmul``; the embedders, the
    modulation and ``proj_out`` do not. Same params, same output up to fp8 rounding (scanned or not); gradients
    reach every kernel."""
    from qk_jax.models import lora as lora_module

    calls = []
    real = lora_module.fp8_matmul
    monkeypatch.setattr(lora_module, "fp8_matmul", lambda x, w: calls.append(w.shape) or real(x, w))
    inputs, _ = _inputs([[rope.SOURCE], [rope.REFERENCE]])
    out = MMDiT(CFG, fp8=True).apply({"params": params}, **inputs)
    assert len(calls) == 12 * CFG.num_layers + 5 * CFG.num_single_layers, calls
    d, mlp = CFG.inner_dim, CFG.mlp_dim
    assert calls[:8].count((d, d)) == 8 and calls.count((d, mlp)) == 2 * CFG.num_layers + CFG.num_single_layers

    ref = _apply(MMDiT(CFG))({"params": params}, **inputs)
    error = np.abs(np.asarray(out) - ref).max() / np.abs(ref).max()
    assert 1e-4 < error < 0.1, error
    scanned = MMDiT(CFG, fp8=True, scan_layers=True).apply({"params": stack_layers(params, CFG)}, **inputs)
    chex.assert_trees_all_close(scanned, out, rtol=1e-5, atol=1e-5)

    def loss(p):
        return jnp.mean(jnp.square(MMDiT(CFG, fp8=True).apply({"params": p}, **inputs)))

    grads = jax.jit(jax.grad(loss))(params)
    kernels = {k: v for k, v in zip(leaf_paths(grads), jax.tree.leaves(grads)) if k.endswith("kernel")}
    assert all(np.isfinite(v).all() and np.abs(v).max() > 0 for v in kernels.values())


def test_input_errors(params):
    inputs, _ = _inputs([[rope.SOURCE], [rope.REFERENCE]])
    model = MMDiT(CFG)
    bad = dict(inputs, hidden_states=inputs["hidden_states"][..., :4])
    with pytest.raises(ValueError, match=f"in_channels={CFG.in_channels}"):
        model.apply({"params": params}, **bad)
    with pytest.raises(ValueError, match="guidance_embeds is False"):
        model.apply({"params": params}, **inputs, guidance=jnp.ones(2))
    with pytest.raises(ValueError, match="target_start and target_len go together"):
        model.apply({"params": params}, **inputs, target_start=jnp.zeros(2, jnp.int32))
    with pytest.raises(ValueError, match="axes_dims_rope"):
        MMDiTConfig(attention_head_dim=16, axes_dims_rope=(4, 4, 4))
    with pytest.raises(ValueError, match="unknown MMDiT config keys"):
        MMDiTConfig.from_config(dict(num_layers=1, depth=3))


def test_config_round_trip():
    diffusers_cfg = CFG.to_diffusers_config()
    assert "rope_theta" not in diffusers_cfg and "mlp_ratio" not in diffusers_cfg
    assert MMDiTConfig.from_config(diffusers_cfg) == CFG
    with pytest.raises(ValueError, match="hard-codes"):
        MMDiTConfig(attention_head_dim=16, axes_dims_rope=(4, 6, 6), rope_theta=500.0).to_diffusers_config()
    with pytest.raises(ValueError, match="no absolute position embedding"):
        dataclasses.replace(CFG, pos_embed="sincos").to_diffusers_config()


FSDP_SCRIPT = textwrap.dedent(
    """
    import flax.linen as nn, jax, jax.numpy as jnp, numpy as np
    jax.config.update("jax_default_matmul_precision", "highest")
    from configs import stage3
    from qk_jax.models.mmdit import MMDiT, MMDiTConfig
    from qk_jax.ops import rope
    from qk_jax.parallel.mesh import logical_shardings, make_mesh

    assert jax.device_count() == 8
    cfg = MMDiTConfig.from_config(stage3.get_config("tiny").mmdit)
    layout = rope.in_context_layout(2, 2, jnp.array([[rope.SOURCE], [rope.REFERENCE]]))
    rng = np.random.default_rng(0)
    inputs = dict(hidden_states=rng.standard_normal((2, 8, cfg.in_channels)).astype(np.float32), img_ids=layout.ids,
                  encoder_hidden_states=rng.standard_normal((2, 4, cfg.joint_attention_dim)).astype(np.float32),
                  txt_ids=rope.text_position_ids(4), timestep=np.array([0.2, 0.9], np.float32),
                  pooled_projections=rng.standard_normal((2, cfg.pooled_projection_dim)).astype(np.float32))
    model = MMDiT(cfg)
    mesh = make_mesh([("data", 1), ("fsdp", 8), ("tensor", 1)])
    abstract = jax.eval_shape(lambda: model.init(jax.random.key(0), **inputs))
    shardings = nn.meta.unbox(logical_shardings(abstract, mesh, [("embed", "fsdp")]))
    params = jax.jit(lambda: nn.meta.unbox(model.init(jax.random.key(0), **inputs)), out_shardings=shardings)()
    kernel = params["params"]["transformer_blocks_0"]["attn"]["to_q"]["kernel"]
    assert kernel.sharding.spec == jax.sharding.PartitionSpec("fsdp", None), kernel.sharding
    assert kernel.addressable_shards[0].data.shape == (cfg.inner_dim // 8, cfg.inner_dim)
    sharded = jax.jit(model.apply)(params, **inputs)
    single = jax.jit(model.apply)(jax.device_put(jax.device_get(params), jax.devices()[0]), **inputs)
    np.testing.assert_allclose(np.asarray(sharded), np.asarray(single), atol=1e-5)
    print("ok")
    """
)


def test_fsdp_sharded_forward_equals_single_device():
    env = fake_devices_env(8)
    out = subprocess.run([sys.executable, "-c", FSDP_SCRIPT], env=env, capture_output=True, text=True, timeout=300,
                         cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr[-3000:]
