"""LoRA dense layer and the pure merge/split functions, against NumPy formulas."""

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qk_jax.models.lora import LoRAConfig, LoRADense, lora_params, merge_lora, strip_lora
from qk_jax.pytree import leaf_paths

CFG = LoRAConfig(rank=4, alpha=8.0, targets=(r"attn/to_(q|v)$", r"ff/net_2$"))


class Toy(nn.Module):
    lora: LoRAConfig | None = CFG

    @nn.compact
    def __call__(self, x):
        """Module paths attn/to_{q,k,v} and ff/net_2, as in a FLUX block."""
        return FF(self.lora, name="ff")(Attn(self.lora, name="attn")(x))


class Attn(nn.Module):
    lora: LoRAConfig | None

    @nn.compact
    def __call__(self, x):
        q = LoRADense(16, lora=self.lora, name="to_q")(x)
        k = LoRADense(16, lora=self.lora, name="to_k")(x)
        v = LoRADense(16, lora=self.lora, name="to_v")(x)
        return q * k + v


class FF(nn.Module):
    lora: LoRAConfig | None

    @nn.compact
    def __call__(self, x):
        return LoRADense(8, lora=self.lora, name="net_2", use_bias=False)(x)


def _init(lora=CFG):
    x = jnp.asarray(np.random.default_rng(0).standard_normal((3, 12)), jnp.float32)
    params = nn.meta.unbox(Toy(lora).init(jax.random.key(0), x))["params"]
    return x, params


def _randomize_b(params, seed=1):
    rng = np.random.default_rng(seed)
    return jax.tree_util.tree_map_with_path(
        lambda p, a: jnp.asarray(rng.standard_normal(a.shape), a.dtype) if p[-1].key == "lora_b" else a, params
    )


def test_targets_select_modules_by_path():
    _, params = _init()
    adapted = {p.rsplit("/", 1)[0] for p in leaf_paths(params) if p.endswith("lora_a")}
    assert adapted == {"attn/to_q", "attn/to_v", "ff/net_2"}
    assert params["attn"]["to_q"]["lora_a"].shape == (12, 4) and params["attn"]["to_q"]["lora_b"].shape == (4, 16)
    _, plain = _init(None)
    assert leaf_paths(plain) == leaf_paths(strip_lora(params))
    _, off = _init(LoRAConfig(rank=0, alpha=8.0, targets=CFG.targets))
    assert not lora_params(off)


def test_zero_initialised_b_gives_the_base_output():
    x, params = _init()
    assert not any(np.asarray(b).any() for b in jax.tree.leaves(lora_params(params)) if b.shape[0] == 4)
    chex.assert_trees_all_close(Toy(CFG).apply({"params": params}, x), Toy(None).apply({"params": strip_lora(params)}, x))
    # lora_a is Kaiming-uniform with bound 1/sqrt(fan_in), as PEFT's lora_A
    a = np.asarray(params["attn"]["to_q"]["lora_a"])
    assert 0 < np.abs(a).max() <= 1 / np.sqrt(12)


def test_adapter_output_matches_the_formula():
    x, params = _init()
    params = _randomize_b(params)
    out = nn.apply(lambda m, x: m(x), LoRADense(16, lora=LoRAConfig(4, 8.0, (".*",)), name="to_q"))(
        {"params": params["attn"]["to_q"]}, x
    )
    p = jax.tree.map(np.asarray, params["attn"]["to_q"])
    ref = np.asarray(x) @ p["kernel"] + p["bias"] + (8.0 / 4) * (np.asarray(x) @ p["lora_a"]) @ p["lora_b"]
    chex.assert_trees_all_close(out, ref.astype(np.float32), atol=1e-5)


def test_fp8_rounds_the_base_matmul_only():
    """``fp8=True``: ``x W`` from e4m3-rounded operands (ml_dtypes, per-tensor current scaling); the adapter and
    the bias exact."""
    import ml_dtypes

    x, params = _init()
    params = _randomize_b(params)
    p = jax.tree.map(np.asarray, params["attn"]["to_q"])
    out = nn.apply(lambda m, x: m(x), LoRADense(16, lora=LoRAConfig(4, 8.0, (".*",)), fp8=True, name="to_q"))(
        {"params": params["attn"]["to_q"]}, x)

    def rounded(a):
        scale = np.abs(a).max() / 448.0
        return (a / scale).astype(ml_dtypes.float8_e4m3fn).astype(np.float64) * scale

    x = np.asarray(x)
    ref = rounded(x) @ rounded(p["kernel"]) + p["bias"] + (8.0 / 4) * (x @ p["lora_a"]) @ p["lora_b"]
    chex.assert_trees_all_close(out, ref.astype(np.float32), atol=1e-5)
    assert np.abs(ref - (x @ p["kernel"] + p["bias"] + 2.0 * (x @ p["lora_a"]) @ p["lora_b"])).max() > 1e-3


def test_merged_params_give_the_unmerged_output():
    x, params = _init()
    params = _randomize_b(params)
    unmerged = Toy(CFG).apply({"params": params}, x)
    merged = merge_lora(params, alpha=CFG.alpha)
    assert not lora_params(merged)
    chex.assert_trees_all_close(Toy(None).apply({"params": merged}, x), unmerged, atol=1e-5)
    assert np.abs(np.asarray(unmerged - Toy(None).apply({"params": strip_lora(params)}, x))).max() > 1e-2
    chex.assert_trees_all_equal(merged["attn"]["to_k"], params["attn"]["to_k"])  # untouched layers stay as they are


def test_merge_handles_stacked_layers_and_keeps_dtype():
    rng = np.random.default_rng(0)
    w = jnp.asarray(rng.standard_normal((3, 6, 5)), jnp.bfloat16)  # [layers, in, out] as under nn.scan
    a = jnp.asarray(rng.standard_normal((3, 6, 2)), jnp.float32)
    b = jnp.asarray(rng.standard_normal((3, 2, 5)), jnp.float32)
    merged = merge_lora({"blocks": {"proj": {"kernel": w, "lora_a": a, "lora_b": b}}}, alpha=4.0)
    k = merged["blocks"]["proj"]["kernel"]
    assert k.dtype == jnp.bfloat16
    ref = np.asarray(w, np.float32) + 2.0 * np.einsum("lir,lro->lio", np.asarray(a), np.asarray(b))
    chex.assert_trees_all_close(k.astype(jnp.float32), ref, atol=0.1, rtol=1e-2)


def test_lora_params_keeps_only_adapters():
    _, params = _init()
    only = lora_params(params)
    assert sorted(leaf_paths(only)) == sorted(
        f"{m}/{leaf}" for m in ("attn/to_q", "attn/to_v", "ff/net_2") for leaf in ("lora_a", "lora_b")
    )


def test_adapter_carries_logical_axes():
    class Sharded(nn.Module):
        @nn.compact
        def __call__(self, x):
            return LoRADense(8, lora=LoRAConfig(2, 2.0, ("proj",)), kernel_axes=("embed", "mlp"), name="proj")(x)

    boxed = jax.eval_shape(Sharded().init, jax.random.key(0), jnp.ones((1, 4)))["params"]["proj"]
    assert boxed["kernel"].names == ("embed", "mlp")
    assert boxed["lora_a"].names == ("embed", "lora_rank") and boxed["lora_b"].names == ("lora_rank", "mlp")


def test_from_config():
    cfg = LoRAConfig.from_config({"rank": 256, "alpha": 256, "targets": ["to_q"]})
    assert cfg == LoRAConfig(256, 256.0, ("to_q",)) and cfg.scale == 1.0
    assert not LoRAConfig.from_config(None).applies_to("to_q")
    with pytest.raises(ValueError, match="without a kernel"):
        merge_lora({"x": {"lora_a": jnp.ones((2, 1)), "lora_b": jnp.ones((1, 2))}}, alpha=1.0)
