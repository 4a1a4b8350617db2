r"""Does the MMDiT copy from its source image? ``python -m qk_jax.diagnose --checkpoint DIR [--task edit]
[--num 16] [--t 0.9] [--seed 0] [--out FILE.json]``

In-context editing (FLUX.1 Kontext, and Query-Kontext's stage 3) keeps what the instruction leaves alone by
copying it: a target token whose pixels the edit keeps can take them from the source token of the same pixel,
which sRoPE places at a fixed offset. This measures whether the model does, on ShapesWorld's held-out samples
of a task with a source image (``edit``, ``subject_edit``), at one noise level ``t``:

- for every MMDiT attention layer and head, the share of the target tokens' attention on the **same-pixel
  source token**, on all source tokens, on reference tokens, on the target's own tokens and on the text/kontext
  stream (these four sum to 1 per query), and on the query itself (part of the target's share);
- the flow-matching loss on the target tokens whose pixels the edit keeps (``kept``) and on those it changes.

A head that ignores position gives the same-pixel token about ``1 / (source tokens)`` of its source share (1/64
at 64 px); a copying head gives it most of it. A model that copies has a ``kept`` loss far below the
``changed`` one and below a text-to-image model's loss at the same t. Probabilities are recomputed here from
the post-RoPE queries and keys each attention sows (``MMDiT`` ``Attention``), with its key mask; the test checks
that they reproduce the layer's own output. By hand because no library reads attention maps of our model.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from absl import flags

from qk_jax import cli, sample as sample_lib
from qk_jax.data import shapes
from qk_jax.models import mmdit as mmdit_lib
from qk_jax.models.query_kontext import QueryKontext
from qk_jax.ops import flow, rope

TASKS = ("edit", "subject_edit")  # the tasks with a source image
SHARES = ("same_pixel_source", "source", "reference", "target", "self", "text")


def attention_probabilities(q: np.ndarray, k: np.ndarray, kv_mask: np.ndarray | None) -> np.ndarray:
    """Softmax attention weights ``[B, H, Q, K]`` of ``q`` ``[B, Q, H, D]`` over ``k`` ``[B, K, H, D]`` (scale
    ``1/sqrt(D)``, ``kv_mask`` ``[B, K]`` False for keys nobody attends), in float64 NumPy."""
    q, k = np.asarray(q, np.float64), np.asarray(k, np.float64)
    logits = np.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(q.shape[-1])
    if kv_mask is not None:
        logits = np.where(np.asarray(kv_mask, bool)[:, None, None, :], logits, -np.inf)
    logits -= logits.max(-1, keepdims=True)
    p = np.exp(logits)
    return p / p.sum(-1, keepdims=True)


def same_pixel_index(layout: rope.Layout, tokens: int) -> np.ndarray:
    """``[B, S]``: for each target token of the image stream, the stream index of the source token of the same
    pixel (``-1`` for other tokens and samples without a source). Blocks are row-major token grids moved whole
    by ``layout.order``, so token ``i`` of the target block and token ``i`` of the source block share a pixel
    whichever sRoPE offset the source has."""
    kind = np.asarray(layout.kind)
    batch, length = kind.shape
    out = np.full((batch, length), -1, np.int64)
    for b in range(batch):
        block_kind = kind[b].reshape(-1, tokens)[:, 0]
        target, source = np.flatnonzero(block_kind == rope.KIND_TARGET), np.flatnonzero(block_kind == rope.KIND_SOURCE)
        if len(target) and len(source):
            out[b, target[0] * tokens:(target[0] + 1) * tokens] = source[0] * tokens + np.arange(tokens)
    return out


def attention_shares(probs: np.ndarray, kind: np.ndarray, same_pixel: np.ndarray, text_len: int
                     ) -> dict[str, np.ndarray]:
    """Per head ``[H]``: the mean over target queries (all samples) of each share in ``SHARES``.

    ``probs`` ``[B, H, L+S, L+S]`` over ``[text; image stream]``; ``kind`` ``[B, S]`` (``rope.KIND_*``);
    ``same_pixel`` ``[B, S]`` from ``same_pixel_index``. ``same_pixel_source`` averages over the target queries
    that have one (NaN when none has)."""
    image = probs[:, :, text_len:, :]  # [B, H, S, L+S]: the image stream's queries
    on_image = image[..., text_len:]  # [B, H, S, S]
    is_target = kind == rope.KIND_TARGET  # [B, S]

    def mean_over_targets(x, where):  # x [B, H, S] -> [H]
        w = where[:, None, :].astype(np.float64)
        return (x * w).sum((0, 2)) / np.maximum(w.sum((0, 2)), 1) if where.any() else np.full(x.shape[1], np.nan)

    def on(key_kind):
        return (on_image * (kind == key_kind)[:, None, None, :]).sum(-1)

    same = np.take_along_axis(on_image, np.maximum(same_pixel, 0)[:, None, :, None], -1)[..., 0]
    return dict(
        same_pixel_source=mean_over_targets(same, is_target & (same_pixel >= 0)),
        source=mean_over_targets(on(rope.KIND_SOURCE), is_target),
        reference=mean_over_targets(on(rope.KIND_REFERENCE), is_target),
        target=mean_over_targets(on(rope.KIND_TARGET), is_target),
        self=mean_over_targets(np.diagonal(on_image, axis1=2, axis2=3), is_target),
        text=mean_over_targets(image[..., :text_len].sum(-1), is_target),
    )


def changed_tokens(source: np.ndarray, target: np.ndarray, latent_hw: tuple[int, int]) -> np.ndarray:
    """``[B, h*w]`` bool: the packed tokens whose pixel patch differs between source and target (uint8 images
    ``[B, H, W, 3]``); row-major, as the target tokens are."""
    h, w = latent_hw
    diff = np.any(np.asarray(source) != np.asarray(target), axis=-1)  # [B, H, W]
    batch, height, width = diff.shape
    return diff.reshape(batch, h, height // h, w, width // w).any((2, 4)).reshape(batch, h * w)


class Probe(NamedTuple):
    """One forward pass of the MMDiT over held-out samples at a fixed t, with what its attentions sowed."""

    error: np.ndarray  # [B, T] squared velocity error per target token (mean over channels)
    changed: np.ndarray  # [B, T] bool, ``changed_tokens``
    layout: rope.Layout  # the image stream's order, sRoPE ids and token kinds
    kv_mask: np.ndarray  # [B, L+S] bool: the keys every attention attends
    text_len: int  # L
    tokens: int  # T, target tokens
    sown: Mapping[str, Any]  # {block name: {"attn": {"query"|"key"|"value"|"output": (array [B, L+S, H, D],)}}}


def probe(sampler: sample_lib.Sampler, task: str = "edit", num: int = 16, t: float = 0.9, seed: int = 0,
          world: shapes.World | None = None) -> Probe:
    """The MMDiT on ``num`` held-out ``task`` samples (``shapes.generate_sample(world, [seed, k], task, 'test')``,
    as ``qk_jax.evaluate`` draws them), noised to ``t`` with noise from ``seed``, conditioned as the sampler's
    fully conditioned branch."""
    if task not in TASKS:
        raise ValueError(f"task {task!r} has no source image to copy from; choose from {', '.join(TASKS)}")
    if not 0.0 < t <= 1.0 or num < 1:
        raise ValueError(f"t={t}, num={num}: t must be in (0, 1] and num >= 1")
    config = sampler.model_config
    if not config.in_context:
        raise ValueError("this checkpoint's model has no in-context inputs (a stage-1/2 model); give a stage-3 one")
    if world is None:
        data = sampler.config["data"]
        if "world" not in data:
            raise ValueError("this checkpoint's config has no data.world; diagnose a ShapesWorld ('shapes' or "
                             "'tiny') checkpoint, or pass a world")
        world = shapes.World.from_config(data["world"], size=int(data["resolution"]))
    params = sampler.params
    if config.scan_layers:
        params = dict(params, mmdit=mmdit_lib.unstack_layers(params["mmdit"], config.mmdit))
    model = QueryKontext(dataclasses.replace(config, remat="none", scan_layers=False))

    items = [shapes.generate_sample(world, [seed, k], task, "test") for k in range(num)]
    requests = [sample_lib.Request(task=task, prompt=it["prompt"], images=tuple(i["image"] for i in it["inputs"]))
                for it in items]
    prepared = sampler.prepare(requests, size=(world.size, world.size), steps=1)
    batch = prepared.batch  # branch-major rows: the first num rows are the fully conditioned branch
    rows = lambda key: jnp.asarray(batch[key][:num])
    cond = jax.jit(model.condition, static_argnums=4)(
        params, rows("input_ids"), rows("attention_mask"), rows("pixel_values"), prepared.image_grid,
        rows("image_present"))
    targets = np.stack([it["target"] for it in items])
    inputs = jnp.asarray(batch["inputs"])  # [num, M, H, W, 3] in [-1, 1]
    images = jnp.concatenate([inputs.reshape((-1,) + inputs.shape[2:]),
                              jnp.asarray(targets, jnp.float32) / 127.5 - 1.0])
    encoded = jax.jit(model.encode)(params, images)  # the VAE once: in-context slots, then the targets
    in_context = encoded[:-num].reshape(inputs.shape[:2] + encoded.shape[1:])  # [num, M, T, 4C]
    x0 = encoded[-num:]  # [num, T, 4C]
    noise = jax.random.normal(jax.random.key(seed), x0.shape, x0.dtype)
    times = jnp.full((num,), t, jnp.float32)
    v, layout, sown = jax.jit(model.velocity_with_attention, static_argnums=4)(
        params, cond, flow.interpolate(x0, noise, times), times, prepared.latent_hw, in_context, rows("roles"))

    sources = np.stack([next(i["image"] for i in it["inputs"] if i["role"] == "source") for it in items])
    error = np.asarray(jnp.mean((v.astype(jnp.float32) - (noise - x0)) ** 2, axis=-1))
    layout = jax.tree.map(np.asarray, layout)
    return Probe(error=error, changed=changed_tokens(sources, targets, prepared.latent_hw), layout=layout,
                 kv_mask=np.concatenate([np.asarray(cond.context_mask, bool), layout.kind != rope.KIND_PAD], axis=1),
                 text_len=int(cond.context.shape[1]), tokens=int(error.shape[1]),
                 sown=jax.tree.map(np.asarray, sown))


def copy_report(sampler: sample_lib.Sampler, task: str = "edit", num: int = 16, t: float = 0.9, seed: int = 0,
                world: shapes.World | None = None) -> dict[str, Any]:
    """The layer-by-head shares and the kept/changed loss of the module docstring, from ``probe``."""
    p = probe(sampler, task, num, t, seed, world)
    same = same_pixel_index(p.layout, p.tokens)
    layers = []
    for name in sorted(p.sown, key=_block_order):
        attn = p.sown[name]["attn"]
        shares = attention_shares(attention_probabilities(attn["query"][0], attn["key"][0], p.kv_mask),
                                  p.layout.kind, same, p.text_len)
        layers.append(dict(layer=name, **{k: [float(x) for x in v] for k, v in shares.items()}))
    kept, changed = p.error[~p.changed], p.error[p.changed]
    return dict(task=task, num=num, t=t, seed=seed, tokens=p.tokens, meta=sampler.meta,
                kept_tokens=float(np.mean(~p.changed)), loss_kept=float(kept.mean()) if kept.size else None,
                loss_changed=float(changed.mean()) if changed.size else None, layers=layers)


def _block_order(name: str) -> tuple[int, int]:
    """``transformer_blocks_3`` before ``single_transformer_blocks_0``, numerically within each stack."""
    prefix, _, index = name.rpartition("_")
    return (0 if prefix == mmdit_lib.BLOCK_STACKS[0][0] else 1, int(index))


def markdown(report: Mapping[str, Any]) -> str:
    """The report as text: the losses, then one row per layer with each share per head."""
    lines = [f"{report['task']}, {report['num']} held-out samples, t = {report['t']}: flow loss on kept tokens "
             + ("n/a" if report["loss_kept"] is None else f"{report['loss_kept']:.4f}")
             + f" ({report['kept_tokens']:.0%} of the target), on changed tokens "
             + ("n/a" if report["loss_changed"] is None else f"{report['loss_changed']:.4f}"),
             f"uniform share of one source token: {1 / report['tokens']:.3f}", "",
             "| layer | " + " | ".join(SHARES) + " |", "|---" * (len(SHARES) + 1) + "|"]
    for row in report["layers"]:
        lines.append(f"| {row['layer']} | " + " | ".join(" ".join(f"{x:.2f}" for x in row[k]) for k in SHARES) + " |")
    return "\n".join(lines)


def define_flags(fv: flags.FlagValues) -> None:
    kw = dict(flag_values=fv)
    flags.DEFINE_string("checkpoint", None, "A stage-3 model directory (a stage's final/).", required=True, **kw)
    flags.DEFINE_enum("task", "edit", TASKS, "The task whose held-out samples to read.", **kw)
    flags.DEFINE_integer("num", 16, "Held-out samples.", lower_bound=1, **kw)
    flags.DEFINE_float("t", 0.9, "Noise level of the probe, in (0, 1].", **kw)
    flags.DEFINE_integer("seed", 0, "Sample and noise seed.", **kw)
    flags.DEFINE_string("out", None, "Also write the report as JSON here.", **kw)


def run_flags(fv: flags.FlagValues) -> dict[str, Any]:
    """Diagnoses as the parsed flags say; prints the report and returns it."""
    report = copy_report(sample_lib.Sampler.from_checkpoint(fv.checkpoint), fv.task, fv.num, fv.t, fv.seed)
    print(markdown(report), flush=True)
    if fv.out:
        with open(fv.out, "w") as f:
            json.dump(report, f, indent=1)
    return report


def main(argv: Sequence[str]) -> dict[str, Any]:
    """``python -m qk_jax.diagnose`` in-process: ``main(['--checkpoint', DIR, '--num', '4'])``."""
    return cli.in_process("qk_jax.diagnose", define_flags, run_flags, argv)


if __name__ == "__main__":
    cli.run_as_program(define_flags, run_flags)
