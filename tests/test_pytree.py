"""Parameter path strings and regex masks."""

import jax.numpy as jnp

from qk_jax.pytree import leaf_paths, match_any, path_str, regex_mask

PARAMS = {
    "vlm": {"model": {"layers_0": {"self_attn": {"q_proj": {"kernel": 1, "lora_a": 2, "lora_b": 3}}}}},
    "mmdit": {"transformer_blocks_0": {"attn": {"to_q": {"kernel": 4}}}},
    "stack": [jnp.zeros(1), jnp.zeros(2)],
}


def test_paths_are_slash_joined_keys_in_leaf_order():
    assert leaf_paths(PARAMS) == [
        "mmdit/transformer_blocks_0/attn/to_q/kernel",
        "stack/0",
        "stack/1",
        "vlm/model/layers_0/self_attn/q_proj/kernel",
        "vlm/model/layers_0/self_attn/q_proj/lora_a",
        "vlm/model/layers_0/self_attn/q_proj/lora_b",
    ]
    assert path_str(("a", "b")) == "a/b"


def test_regex_mask_uses_search_semantics():
    mask = regex_mask(PARAMS, [r"^vlm/.*/lora_[ab]$", r"to_q/kernel"])
    assert mask["vlm"]["model"]["layers_0"]["self_attn"]["q_proj"] == {"kernel": False, "lora_a": True, "lora_b": True}
    assert mask["mmdit"]["transformer_blocks_0"]["attn"]["to_q"]["kernel"] is True
    assert mask["stack"] == [False, False]
    assert not match_any("vae/encoder/conv_in/kernel", [])


def test_leaf_shapes_and_their_differences():
    from typing import NamedTuple

    import numpy as np

    from qk_jax.pytree import leaf_shapes, shape_differences

    class State(NamedTuple):
        mu: dict
        count: int

    tree = {"a": {"kernel": np.zeros((2, 3))}, "opt": [State(mu={"w": np.zeros(4)}, count=0)]}
    assert leaf_shapes(tree) == {"a/kernel": (2, 3), "opt/0/mu/w": (4,)}  # leaves without a shape are left out
    found, wanted = {"a": (2, 3), "b": (1,), "x": (5,)}, {"a": (3, 2), "b": (1,), "c": (7,)}
    assert shape_differences(found, wanted, "now") == ["a: shape (2, 3) in the checkpoint, (3, 2) now", "c: missing",
                                                       "x: not made by the config"]
