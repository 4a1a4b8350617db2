"""The connector MLP and the MMDiT conditioning it assembles, against NumPy formulas."""

import math

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.special import erf

from configs import stage3
from qk_jax.models.connector import Connector, ConnectorConfig, masked_mean

CFG = ConnectorConfig(in_features=12, hidden_features=10, out_features=8)
B, LT, K = 2, 5, 3


def _inputs(seed=0):
    rng = np.random.default_rng(seed)
    text = rng.standard_normal((B, LT, CFG.in_features)).astype(np.float32)
    queries = rng.standard_normal((B, K, CFG.in_features)).astype(np.float32)
    text_mask = np.array([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], bool)
    return text, queries, text_mask


@pytest.fixture(scope="module")
def params():
    text, queries, _ = _inputs()
    params = nn.meta.unbox(Connector(CFG).init(jax.random.key(0), text, queries))["params"]
    # Non-zero biases, so that the formula below checks them.
    return jax.tree.map(lambda a: a + 0.1 * jax.random.normal(jax.random.key(1), a.shape), params)


def _np_mlp(p, x):
    h = x @ np.asarray(p["linear_1"]["kernel"]) + np.asarray(p["linear_1"]["bias"])
    h = 0.5 * h * (1.0 + erf(h / math.sqrt(2.0)))  # exact GELU
    return h @ np.asarray(p["linear_2"]["kernel"]) + np.asarray(p["linear_2"]["bias"])


def test_paper_param_count():
    """3584 -> 960 -> 2560 with biases: 5,901,760 parameters (table 11: 5.9M), from configs and by default."""
    for cfg in (ConnectorConfig(), ConnectorConfig.from_config(stage3.get_config().connector)):
        x = jax.ShapeDtypeStruct((1, 1, cfg.in_features), jnp.float32)
        shapes = jax.eval_shape(lambda t, q: Connector(cfg).init(jax.random.key(0), t, q), x, x)
        assert sum(math.prod(a.shape) for a in jax.tree.leaves(nn.meta.unbox(shapes))) == 5_901_760


def test_logical_axes():
    text, queries, _ = _inputs()
    boxed = jax.eval_shape(lambda: Connector(CFG).init(jax.random.key(0), text, queries))["params"]
    assert boxed["linear_1"]["kernel"].names == ("embed", "mlp")
    assert boxed["linear_2"]["kernel"].names == ("mlp", "embed")


def test_text_and_queries_against_numpy(params):
    text, queries, text_mask = _inputs()
    out = Connector(CFG).apply({"params": params}, text, queries, text_mask)
    t, q = _np_mlp(params, text), _np_mlp(params, queries)
    chex.assert_trees_all_close(out.context, np.concatenate([t, q], axis=1), atol=1e-5)
    chex.assert_trees_all_close(out.pooled, q.mean(axis=1), atol=1e-5)
    np.testing.assert_array_equal(out.context_mask, np.concatenate([text_mask, np.ones((B, K), bool)], axis=1))


def test_ablation_modes(params):
    text, queries, text_mask = _inputs()
    model = Connector(CFG)
    t, q = _np_mlp(params, text), _np_mlp(params, queries)

    text_only = model.apply({"params": params}, text, None, text_mask, conditioning="text_only")
    chex.assert_trees_all_close(text_only.context, t, atol=1e-5)
    np.testing.assert_array_equal(text_only.context_mask, text_mask)
    m = text_mask[..., None].astype(np.float32)
    chex.assert_trees_all_close(text_only.pooled, (t * m).sum(1) / m.sum(1), atol=1e-5)  # masked mean
    # The padded tokens' values do not reach the pooled vector.
    poked = np.where(text_mask[..., None], text, 100.0).astype(np.float32)
    chex.assert_trees_all_close(
        model.apply({"params": params}, poked, None, text_mask, conditioning="text_only").pooled, text_only.pooled,
        atol=1e-5)

    queries_only = model.apply({"params": params}, None, queries, conditioning="queries_only")
    chex.assert_trees_all_close(queries_only.context, q, atol=1e-5)
    chex.assert_trees_all_close(queries_only.pooled, q.mean(axis=1), atol=1e-5)
    assert queries_only.context_mask.shape == (B, K) and queries_only.context_mask.all()


def test_masked_mean_of_empty_rows_is_zero():
    x = jnp.ones((2, 3, 4))
    out = masked_mean(x, jnp.array([[False] * 3, [True, False, False]]))
    np.testing.assert_array_equal(out, np.stack([np.zeros(4), np.ones(4)]))


def test_errors(params):
    text, queries, _ = _inputs()
    model = Connector(CFG)
    with pytest.raises(ValueError, match="unknown conditioning"):
        model.apply({"params": params}, text, queries, conditioning="both")
    with pytest.raises(ValueError, match="needs the kontext query"):
        model.apply({"params": params}, text, None)
    with pytest.raises(ValueError, match="in_features is 12"):
        model.apply({"params": params}, text[..., :6], queries)
    with pytest.raises(ValueError, match="unknown connector config keys"):
        ConnectorConfig.from_config(dict(in_features=1, hidden_features=1, out_features=1, width=3))


def test_pooled_proj_maps_the_kontext_mean_to_a_flux_pooled_width():
    """FLUX.1's pooled width (768) differs from its context width (4096): pooled = pooled_proj(mean(mlp(Q)))."""
    cfg = ConnectorConfig(in_features=12, hidden_features=10, out_features=8, pooled_features=6)
    text, queries, text_mask = _inputs()
    params = nn.meta.unbox(Connector(cfg).init(jax.random.key(0), text, queries))["params"]
    params = jax.tree.map(lambda a: a + 0.1 * jax.random.normal(jax.random.key(2), a.shape), params)
    boxed = jax.eval_shape(lambda: Connector(cfg).init(jax.random.key(0), text, queries))["params"]
    kernel = boxed["pooled_proj"]["kernel"]
    assert kernel.names == ("embed", "mlp") and kernel.value.shape == (8, 6)
    out = Connector(cfg).apply({"params": params}, text, queries, text_mask)
    q = _np_mlp(params, queries)
    want = q.mean(axis=1) @ np.asarray(params["pooled_proj"]["kernel"]) + np.asarray(params["pooled_proj"]["bias"])
    chex.assert_trees_all_close(out.pooled, want, atol=1e-5)
    assert out.context.shape == (B, LT + K, 8) and cfg.pooled_width == 6 and CFG.pooled_width == 8
    assert "pooled_proj" not in params_of(CFG)


def params_of(cfg):
    text, queries, _ = _inputs()
    return jax.eval_shape(lambda: Connector(cfg).init(jax.random.key(0), text, queries))["params"]
