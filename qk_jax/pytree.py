"""Parameter paths: the one way qk_jax names a leaf of a params pytree.

A leaf's path is its dict keys joined by ``/`` (``mmdit/transformer_blocks_0/attn/to_q/kernel``). Trainable
sets, LoRA targets and sharding rules are regexes over these strings (``re.search``), as in big_vision.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from typing import Any

import jax

PyTree = Any


def path_str(key_path: tuple[Any, ...]) -> str:
    """``('mmdit', 'proj_out', 'kernel')`` or a jax key path -> ``'mmdit/proj_out/kernel'``."""
    parts = []
    for k in key_path:
        for attr in ("key", "name", "idx"):
            if hasattr(k, attr):
                k = getattr(k, attr)
                break
        parts.append(str(k))
    return "/".join(parts)


def leaf_paths(tree: PyTree) -> list[str]:
    """The path of every leaf, in ``jax.tree.leaves`` order."""
    return [path_str(p) for p, _ in jax.tree_util.tree_flatten_with_path(tree)[0]]


def flatten(tree: PyTree) -> dict[str, Any]:
    """``{path: leaf}`` for every leaf, in ``jax.tree.leaves`` order."""
    flat, _ = jax.tree_util.tree_flatten_with_path(tree)
    return {path_str(p): leaf for p, leaf in flat}


def unflatten(flat: Mapping[str, Any]) -> dict[str, Any]:
    """The nested dict of ``{path: leaf}`` (the inverse of ``flatten`` for nested dicts)."""
    tree: dict[str, Any] = {}
    for path, leaf in flat.items():
        set_path(tree, path, leaf)
    return tree


def match_any(path: str, regexes: Iterable[str]) -> bool:
    """True when any regex ``re.search``-matches ``path``."""
    return any(re.search(r, path) for r in regexes)


def regex_mask(tree: PyTree, regexes: Iterable[str]) -> PyTree:
    """A pytree of bools like ``tree``: True where the leaf's path matches one of ``regexes``."""
    regexes = tuple(regexes)
    return jax.tree_util.tree_map_with_path(lambda p, _: match_any(path_str(p), regexes), tree)


def get_path(tree: Mapping[str, Any], path: str) -> Any:
    """The node at a '/'-joined path of a nested dict."""
    for key in path.split("/"):
        tree = tree[key]
    return tree


def set_path(tree: dict[str, Any], path: str, value: Any) -> None:
    """Set the node at a '/'-joined path of a nested dict, creating the dicts on the way."""
    *parents, leaf = path.split("/")
    for key in parents:
        tree = tree.setdefault(key, {})
    tree[leaf] = value


def leaf_shapes(tree: PyTree) -> dict[str, tuple[int, ...]]:
    """``{path: shape}`` of every leaf with a shape (arrays, ``ShapeDtypeStruct``s, Orbax's array metadata), in
    any pytree (dicts, lists, NamedTuples: an optimizer state too)."""
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {path_str(path): tuple(leaf.shape) for path, leaf in leaves if hasattr(leaf, "shape")}


def shape_differences(found: Mapping[str, tuple], wanted: Mapping[str, tuple], wanted_as: str) -> list[str]:
    """What differs between two ``leaf_shapes`` (``found`` in a checkpoint, ``wanted`` ``wanted_as`` says whence),
    one phrase per leaf: different shapes first, then missing leaves, then extra ones."""
    problems = [f"{p}: shape {found[p]} in the checkpoint, {wanted[p]} {wanted_as}" for p in wanted
                if p in found and found[p] != wanted[p]]
    problems += [f"{p}: missing" for p in wanted if p not in found]
    return problems + [f"{p}: not made by the config" for p in found if p not in wanted]
