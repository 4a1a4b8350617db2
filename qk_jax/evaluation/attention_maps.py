r"""Does the MMDiT copy from its in-context images? (The command: ``python -m qk_jax.diagnose --checkpoint DIR
[--task edit] [--num 16] [--t 0.9] [--seed 0] [--out FILE.json]``.)

In-context editing (FLUX.1 Kontext, and Query-Kontext's stage 3) keeps what the instruction leaves alone by
copying it: a target token whose pixels the edit keeps can take them from the source token of the same pixel,
which sRoPE places at a fixed offset. Subject-driven generation must instead find the subject in a reference
image and carry its look (texture, colours) to wherever the prompt puts it: a content lookup, not a fixed offset.
This measures both, on ShapesWorld's held-out samples of a task with in-context images (``edit``, ``custom``,
``multi``, ``subject_edit``), at one noise level ``t``:

- for every MMDiT attention layer and head, the share of the target tokens' attention on the **same-pixel
  source token**, on all source tokens, on reference tokens, on the target's own tokens and on the text/kontext
  stream (these four sum to 1 per query), and on the query itself (part of the target's share);
- for the tasks with references, the share of the attention of the target tokens a subject covers on **its
  reference's subject tokens** (``subject_reference``), beside ``subject_uniform``: what a head attending
  every key alike would give them;
- the flow-matching loss on the target tokens the instruction keeps (``kept``: equal to the source, or for tasks
  without one to the empty canvas) and on those it changes.

A head that ignores position gives the same-pixel token about ``1 / (source tokens)`` of its source share (1/64
at 64 px); a copying head gives it most of it. A model that copies has a ``kept`` loss far below the
``changed`` one and below a text-to-image model's loss at the same t. A head that looks up the subject gives
``subject_reference`` many times ``subject_uniform``. Probabilities are recomputed here from the post-RoPE
queries and keys each attention sows (``MMDiT`` ``Attention``), with its key mask; the test checks that they
reproduce the layer's own output. By hand because no library reads attention maps of our model.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from qk_jax import sampling
from qk_jax.data import tasks
from qk_jax.data import shapesworld
from qk_jax.models import mmdit as mmdit_lib
from qk_jax.models.query_kontext import QueryKontext
from qk_jax.ops import flow, rope

TASKS = tasks.IN_CONTEXT_TASKS  # edit, custom, multi, subject_edit
SHARES = ("same_pixel_source", "source", "reference", "target", "self", "text", "subject_reference")


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


class SubjectTokens(NamedTuple):
    """Where each subject is in the image stream: ``R`` subjects per sample (padded with empty rows)."""

    queries: np.ndarray  # [B, R, S] bool: target tokens the subject covers
    keys: np.ndarray  # [B, R, S] bool: the subject's tokens in its reference image

    def uniform(self, kv_mask: np.ndarray) -> float:
        """The ``subject_reference`` share of a head attending every key alike (``kv_mask`` ``[B, L+S]``)."""
        per = self.keys.sum(-1) / kv_mask.sum(-1, keepdims=True)  # [B, R]
        w = self.queries.sum(-1)
        return float((per * w).sum() / w.sum()) if w.sum() else float("nan")


def subject_tokens(items: Sequence[Mapping[str, Any]], layout: rope.Layout, latent_hw: tuple[int, int],
                   world: shapesworld.World) -> SubjectTokens:
    """``SubjectTokens`` of ShapesWorld samples (``shapesworld.generate_sample`` dicts) laid out as ``layout`` says:
    each reference's subject is found in the target scene (same shape, texture and colours), drawn alone, and
    its tokens matched to the reference image's non-empty tokens. Input ``m`` of a sample is its slot ``m``."""
    tokens = latent_hw[0] * latent_hw[1]
    order, (batch, length) = np.asarray(layout.order), np.asarray(layout.kind).shape
    refs = [[m for m, x in enumerate(it["inputs"]) if x["role"] == "reference"] for it in items]
    queries = np.zeros((batch, max(map(len, refs), default=0), length), bool)
    keys = np.zeros_like(queries)
    blank = shapesworld.render([], world)[None]
    for b, item in enumerate(items):
        block = {int(o): j for j, o in enumerate(order[b])}  # block of [target, slot_1..] -> sequence block
        for r, m in enumerate(refs[b]):
            want = shapesworld.subject_key(item["inputs"][m]["subject"])
            drawn = [o for o in item["target_scene"] if shapesworld.is_subject(o) and shapesworld.subject_key(o) == want]
            if not drawn:
                raise ValueError(f"sample {b}: the subject of input {m + 1} is not in its target")
            where = changed_tokens(blank, shapesworld.render(drawn[:1], world)[None], latent_hw)[0]
            queries[b, r, block[0] * tokens:(block[0] + 1) * tokens] = where
            ref = changed_tokens(blank, item["inputs"][m]["image"][None], latent_hw)[0]
            keys[b, r, block[m + 1] * tokens:(block[m + 1] + 1) * tokens] = ref
    return SubjectTokens(queries=queries, keys=keys)


def attention_shares(probs: np.ndarray, kind: np.ndarray, same_pixel: np.ndarray, text_len: int,
                     subjects: SubjectTokens | None = None) -> dict[str, np.ndarray]:
    """Per head ``[H]``: the mean over target queries (all samples) of each share in ``SHARES``.

    ``probs`` ``[B, H, L+S, L+S]`` over ``[text; image stream]``; ``kind`` ``[B, S]`` (``rope.KIND_*``);
    ``same_pixel`` ``[B, S]`` from ``same_pixel_index``. ``same_pixel_source`` averages over the target queries
    that have one, ``subject_reference`` over the target tokens of every subject of ``subjects`` (its mass on
    that subject's reference tokens); each is NaN when there is nothing to average."""
    image = probs[:, :, text_len:, :]  # [B, H, S, L+S]: the image stream's queries
    on_image = image[..., text_len:]  # [B, H, S, S]
    is_target = kind == rope.KIND_TARGET  # [B, S]

    def mean_over_targets(x, where):  # x [B, H, S] -> [H]
        w = where[:, None, :].astype(np.float64)
        return (x * w).sum((0, 2)) / np.maximum(w.sum((0, 2)), 1) if where.any() else np.full(x.shape[1], np.nan)

    def on(key_kind):
        return (on_image * (kind == key_kind)[:, None, None, :]).sum(-1)

    same = np.take_along_axis(on_image, np.maximum(same_pixel, 0)[:, None, :, None], -1)[..., 0]
    if subjects is None or not subjects.queries.any():
        subject_reference = np.full(probs.shape[1], np.nan)
    else:
        mass = np.einsum("bhqk,brk->bhrq", on_image, subjects.keys.astype(np.float64))  # on subject r's ref tokens
        w = subjects.queries[:, None].astype(np.float64)  # [B, 1, R, S]
        subject_reference = (mass * w).sum((0, 2, 3)) / w.sum()
    return dict(
        same_pixel_source=mean_over_targets(same, is_target & (same_pixel >= 0)),
        source=mean_over_targets(on(rope.KIND_SOURCE), is_target),
        reference=mean_over_targets(on(rope.KIND_REFERENCE), is_target),
        target=mean_over_targets(on(rope.KIND_TARGET), is_target),
        self=mean_over_targets(np.diagonal(on_image, axis1=2, axis2=3), is_target),
        text=mean_over_targets(image[..., :text_len].sum(-1), is_target),
        subject_reference=subject_reference,
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
    subjects: SubjectTokens  # the subjects' tokens (no rows for tasks without references)
    sown: Mapping[str, Any]  # {block name: {"attn": {"query"|"key"|"value"|"output": (array [B, L+S, H, D],)}}}


def probe(sampler: sampling.Sampler, task: str = "edit", num: int = 16, t: float = 0.9, seed: int = 0,
          world: shapesworld.World | None = None) -> Probe:
    """The MMDiT on ``num`` held-out ``task`` samples (``shapesworld.generate_sample(world, [seed, k], task, 'test')``,
    as ``qk_jax.evaluation.scoring`` draws them), noised to ``t`` with noise from ``seed``, conditioned as the sampler's
    fully conditioned branch."""
    if task not in TASKS:
        raise ValueError(f"task {task!r} has no in-context image to copy from; choose from {', '.join(TASKS)}")
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
        world = shapesworld.World.from_config(data["world"], size=int(data["resolution"]))
    params = sampler.params
    if config.scan_layers:
        params = dict(params, mmdit=mmdit_lib.unstack_layers(params["mmdit"], config.mmdit))
    model = QueryKontext(dataclasses.replace(config, remat="none", scan_layers=False))

    items = [shapesworld.generate_sample(world, [seed, k], task, "test") for k in range(num)]
    requests = [sampling.Request(task=task, prompt=it["prompt"], images=tuple(i["image"] for i in it["inputs"]))
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

    blank = shapesworld.render([], world)  # what a task without a source starts from
    sources = np.stack([next((i["image"] for i in it["inputs"] if i["role"] == "source"), blank) for it in items])
    error = np.asarray(jnp.mean((v.astype(jnp.float32) - (noise - x0)) ** 2, axis=-1))
    layout = jax.tree.map(np.asarray, layout)
    return Probe(error=error, changed=changed_tokens(sources, targets, prepared.latent_hw), layout=layout,
                 kv_mask=np.concatenate([np.asarray(cond.context_mask, bool), layout.kind != rope.KIND_PAD], axis=1),
                 text_len=int(cond.context.shape[1]), tokens=int(error.shape[1]),
                 subjects=subject_tokens(items, layout, prepared.latent_hw, world), sown=jax.tree.map(np.asarray, sown))


def copy_report(sampler: sampling.Sampler, task: str = "edit", num: int = 16, t: float = 0.9, seed: int = 0,
                world: shapesworld.World | None = None) -> dict[str, Any]:
    """The layer-by-head shares and the kept/changed loss of the module docstring, from ``probe``."""
    p = probe(sampler, task, num, t, seed, world)
    same = same_pixel_index(p.layout, p.tokens)
    layers = []
    for name in sorted(p.sown, key=_block_order):
        attn = p.sown[name]["attn"]
        shares = attention_shares(attention_probabilities(attn["query"][0], attn["key"][0], p.kv_mask),
                                  p.layout.kind, same, p.text_len, p.subjects)
        layers.append(dict(layer=name, **{k: [_number(x) for x in v] for k, v in shares.items()}))
    kept, changed = p.error[~p.changed], p.error[p.changed]
    return dict(task=task, num=num, t=t, seed=seed, tokens=p.tokens, meta=sampler.meta,
                kept_tokens=float(np.mean(~p.changed)), loss_kept=float(kept.mean()) if kept.size else None,
                loss_changed=float(changed.mean()) if changed.size else None,
                subject_uniform=_number(p.subjects.uniform(p.kv_mask)), layers=layers)


def _number(x: float) -> float | None:
    """A JSON-safe figure: None for NaN (nothing to average)."""
    return None if np.isnan(x) else float(x)


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
             f"uniform share of one source token: {1 / report['tokens']:.3f}"]
    if report["subject_uniform"] is not None:
        lines.append(f"uniform share of a subject's reference tokens: {report['subject_uniform']:.3f}")
    # Columns with nothing to average in this task (same-pixel without a source, subject without a reference) go.
    shares = [k for k in SHARES if any(x is not None for row in report["layers"] for x in row[k])]
    lines += ["", "| layer | " + " | ".join(shares) + " |", "|---" * (len(shares) + 1) + "|"]
    cell = lambda values: " ".join("-" if x is None else f"{x:.2f}" for x in values)
    for row in report["layers"]:
        lines.append(f"| {row['layer']} | " + " | ".join(cell(row[k]) for k in shares) + " |")
    return "\n".join(lines)
