"""Whole-model conversion: transformers/diffusers folders -> a model checkpoint, and a checkpoint -> folders.

``import_model`` builds a stage's initial model checkpoint (``qk_jax.models.saved_model.save_model`` layout:
``params = {vlm, connector, mmdit, vae}`` + the stage config) from a Qwen2.5-VL folder and, optionally, a FLUX
transformer folder and an ``AutoencoderKL`` folder. Components that are not given are randomly initialised;
the kontext queries and the connector are always fresh (they do not exist outside Query-Kontext), and so are
LoRA adapters (``lora_b`` zero: the imported model's outputs are unchanged). Every imported component's config
must equal the stage config's block (an error names the first field that differs).

``export_model`` writes a checkpoint as the folders the torch ecosystem loads (``EXPORT_README`` says how they
fit together; ``qk_jax.convert.torch_reference`` is the runnable torch version of that description)::

    vlm/                    Qwen2_5_VLForConditionalGeneration (LoRA merged with config.vlm.lora.alpha)
    transformer/            FluxTransformer2DModel (LoRA merged with config.mmdit.lora.alpha)
    vae/                    AutoencoderKL
    kontext.safetensors     kontext_queries [K, hidden]; connector.linear_{1,2}.{weight,bias} (torch layout)
    kontext_config.json     what the folders do not say: K, conditioning, connector dims, sRoPE, flow shift, ...
    README.md

Tensors keep the checkpoint's dtype (a bf16 checkpoint exports bf16).
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from qk_jax.convert import diffusers_mmdit, diffusers_vae, hf_qwen_vl
from qk_jax.data import processors
from qk_jax.convert.safetensors_io import (
    CheckpointError,
    SafetensorsReader,
    write_safetensors,
)
from qk_jax.models import saved_model
from qk_jax.models.lora import LORA_A, LORA_B
from qk_jax.models.mmdit import init_inputs as mmdit_init_inputs
from qk_jax.models.mmdit import with_layout
from qk_jax.models.query_kontext import QueryKontext, QueryKontextConfig
from qk_jax.models.qwen_vl import init_inputs as vlm_init_inputs
from qk_jax.pytree import flatten, unflatten

COMPONENTS = ("vlm", "connector", "mmdit", "vae")
# The exported folder's layout.
VLM_DIR, TRANSFORMER_DIR, VAE_DIR = "vlm", "transformer", "vae"
KONTEXT_WEIGHTS, KONTEXT_CONFIG, README = "kontext.safetensors", "kontext_config.json", "README.md"
QUERIES = hf_qwen_vl.QUERIES  # "kontext_queries"
# Our connector leaves -> torch names (nn.Linear: weight [out, in] = our kernel transposed).
CONNECTOR_TENSORS = (("linear_1/kernel", "connector.linear_1.weight", True),
                     ("linear_1/bias", "connector.linear_1.bias", False),
                     ("linear_2/kernel", "connector.linear_2.weight", True),
                     ("linear_2/bias", "connector.linear_2.bias", False),
                     # Only where the MMDiT's pooled width is not its context width (FLUX.1 layouts).
                     ("pooled_proj/kernel", "connector.pooled_proj.weight", True),
                     ("pooled_proj/bias", "connector.pooled_proj.bias", False))
# Config fields that describe a file rather than the model: never compared between a folder and the stage.
_VAE_UNCHECKED = ("sample_size", "force_upcast", "latents_mean", "latents_std")
_VLM_UNCHECKED = ("num_queries", "query_attention", "lora", "dtype", "param_dtype")

Log = Callable[[str], None]


# ----------------------------------------------------------------------------------------------------------
# Import: folders -> model checkpoint
# ----------------------------------------------------------------------------------------------------------


def _differences(found: Any, expected: Any, prefix: str, skip: tuple[str, ...] = ()) -> list[str]:
    """``'field: folder X, config Y'`` for every differing dataclass field (nested dataclasses recursed)."""
    out = []
    for f in dataclasses.fields(expected):
        if f.name in skip:
            continue
        a, b = getattr(found, f.name), getattr(expected, f.name)
        if dataclasses.is_dataclass(b):
            out += _differences(a, b, f"{prefix}.{f.name}")
        elif (tuple(a) if isinstance(a, list) else a) != (tuple(b) if isinstance(b, list) else b):
            out.append(f"{prefix}.{f.name}: folder has {a!r}, the stage config {b!r}")
    return out


def _check_config(folder: str | os.PathLike, component: str, found: Any, expected: Any,
                  skip: tuple[str, ...] = ()) -> None:
    diffs = _differences(found, expected, f"config.{component}", skip)
    if diffs:
        raise CheckpointError(
            f"{folder}: its config.json does not match the stage config's {component} block: {'; '.join(diffs[:5])}"
            f"{f' (and {len(diffs) - 5} more)' if len(diffs) > 5 else ''}. Import with the config variant that"
            " describes this model, or override the field (--config.<field>=...).")


def _abstract_leaves(module: Any, init_kwargs: Mapping[str, Any]) -> dict[str, jax.ShapeDtypeStruct]:
    """``{path: ShapeDtypeStruct}`` of a module's params (nothing allocated)."""
    abstract = jax.eval_shape(lambda k: module.init(k, **init_kwargs)["params"], jax.random.key(0))
    return flatten(nn.meta.unbox(abstract))


def _fresh_leaves(module: Any, init_kwargs: Mapping[str, Any], key: jax.Array) -> dict[str, np.ndarray]:
    """Freshly initialised LoRA adapters and kontext queries of a module, nothing else: the jitted init returns
    only those leaves, so XLA never materialises the (imported) rest, a 7B VLM included."""

    def init(k):
        flat = flatten(nn.meta.unbox(module.init(k, **init_kwargs)["params"]))
        return {p: v for p, v in flat.items() if _is_adapter_or_query(p)}

    return jax.device_get(jax.jit(init)(key))


def _graft(imported: Mapping[str, Any], fresh: Mapping[str, Any], abstract: Mapping[str, Any], component: str
           ) -> tuple[dict[str, Any], list[str]]:
    """The component's params: ``imported`` (a nested tree) plus the ``fresh`` leaves (flat ``{path: array}``);
    returns them and the fresh paths. Against the model's ``abstract`` leaves: a leaf the model does not have,
    one of another shape, or one that neither side gives is an error naming it."""
    theirs = {**flatten(imported), **fresh}
    unknown = sorted(set(theirs) - set(abstract))
    if unknown:
        raise CheckpointError(f"{component}: imported params the model does not have: {unknown[:5]}")
    missing = sorted(set(abstract) - set(theirs))
    if missing:
        raise CheckpointError(f"{component}: the imported folder lacks {missing[:5]}")
    for path, value in theirs.items():
        if tuple(value.shape) != tuple(abstract[path].shape):
            raise CheckpointError(f"{component}: imported {path} has shape {tuple(value.shape)}, the model"
                                  f" {tuple(abstract[path].shape)}")
    return unflatten(theirs), sorted(fresh)


def _is_adapter_or_query(path: str) -> bool:
    return path.rsplit("/", 1)[-1] in (LORA_A, LORA_B, QUERIES)


def _unused(folder: str | os.PathLike, weights_name: str, used: set[str]) -> list[str]:
    """Tensors of the folder that no param was read from."""
    return sorted(set(SafetensorsReader(folder, weights_name).keys()) - used)


def _size(tree: Any) -> tuple[int, int, int]:
    """(tensors, parameters, bytes) of a params tree."""
    leaves = jax.tree.leaves(tree)
    return len(leaves), sum(int(np.prod(x.shape)) for x in leaves), sum(int(x.nbytes) for x in leaves)


def import_model(
    config: Any,
    out: str | os.PathLike,
    *,
    qwen: str | os.PathLike,
    mmdit: str | os.PathLike | None = None,
    vae: str | os.PathLike | None = None,
    dtype: Any = jnp.float32,
    seed: int = 0,
    log: Log = print,
) -> dict[str, Any]:
    """Write a stage's initial model checkpoint to ``out`` from transformers/diffusers folders.

    Args:
      config: the stage config (``configs/stageN.py``'s ``get_config``).
      out: a new (or empty) directory for ``checkpoint.save_model``.
      qwen: a ``Qwen2_5_VLForConditionalGeneration`` folder (its ``config.json`` must match ``config.vlm``).
      mmdit: a diffusers ``FluxTransformer2DModel`` folder (must match ``config.mmdit``), or None: random.
      vae: a diffusers ``AutoencoderKL`` folder (must match ``config.vae``), or None: random.
      dtype: dtype of every stored param.
      seed: seed of the random parts.
      log: progress lines (stdout by default).

    Returns:
      A summary: per component ``source`` (folder or ``'random'``), ``tensors``, ``params``, ``bytes``,
      ``fresh`` (leaves not imported) and ``unused`` (tensors of the folder that were not read).
    """
    model = QueryKontext(QueryKontextConfig.from_config(config))
    mc = model.config
    summary: dict[str, dict[str, Any]] = {c: dict(source="random", fresh=[], unused=[]) for c in COMPONENTS}
    imported: dict[str, Any] = {}

    # Read and check every folder before the (slower) initialisation, so that a bad folder fails fast.
    log(f"reading the VLM from {qwen}")
    vlm_config, imported["vlm"] = hf_qwen_vl.load(qwen, dtype=dtype)
    _check_config(qwen, "vlm", vlm_config, mc.vlm, _VLM_UNCHECKED)
    used = {e.hf_name for e in hf_qwen_vl.entries(vlm_config)}
    used |= {v5 + name[len(saved):] for name in used for v5, saved in hf_qwen_vl.V5_PREFIXES if name.startswith(saved)}
    summary["vlm"].update(source=str(qwen), unused=_unused(qwen, "model", used))
    if mmdit is not None:
        log(f"reading the MMDiT from {mmdit}")
        mmdit_config, imported["mmdit"] = diffusers_mmdit.load(mmdit, dtype=dtype)
        _check_config(mmdit, "mmdit", mmdit_config, mc.mmdit)
        imported["mmdit"] = with_layout(imported["mmdit"], mc.mmdit, mc.scan_layers)
        used = {t.diffusers for t in diffusers_mmdit.tensor_table(mmdit_config)}
        summary["mmdit"].update(source=str(mmdit), unused=_unused(mmdit, diffusers_mmdit.WEIGHTS_NAME, used))
    if vae is not None:
        log(f"reading the VAE from {vae}")
        vae_config, imported["vae"] = diffusers_vae.load(vae, dtype=dtype)
        _check_config(vae, "vae", vae_config, mc.vae, _VAE_UNCHECKED)
        used = {row.theirs for row in diffusers_vae.name_table(vae_config)}
        summary["vae"].update(source=str(vae), unused=_unused(vae, diffusers_vae.WEIGHTS_NAME, used))

    # Components not imported and the connector: random. Imported VLM/MMDiT: their queries and adapters fresh.
    random_components = tuple(c for c in COMPONENTS if c not in imported)
    log(f"initialising {', '.join(random_components)} (seed {seed})")
    key_random, key_fresh = jax.random.split(jax.random.key(seed))
    params = model.init(key_random, components=random_components)
    inputs = dict(vlm=vlm_init_inputs(mc.vlm), mmdit=mmdit_init_inputs(mc.mmdit))
    for name, tree in imported.items():
        if name == "vae":
            params["vae"] = tree
            continue
        fresh = _fresh_leaves(getattr(model, name), inputs[name], jax.random.fold_in(key_fresh, len(name)))
        params[name], summary[name]["fresh"] = _graft(tree, fresh, _abstract_leaves(getattr(model, name), inputs[name]),
                                                      name)

    np_dtype = np.dtype(jnp.dtype(dtype))
    params = jax.tree.map(lambda x: np.asarray(x).astype(np_dtype, copy=False), params)
    for name in COMPONENTS:
        s = summary[name]
        s["tensors"], s["params"], s["bytes"] = _size(params[name])
        note = "RANDOMLY INITIALISED (no folder given)" if s["source"] == "random" else f"imported from {s['source']}"
        if name == "connector":
            note = "fresh (random): the connector is Query-Kontext's own"
        log(f"  {name:9s} {s['tensors']:5d} tensors {s['params']:>14,d} params {s['bytes']:>15,d} bytes  {note}")
        if s["fresh"] and s["source"] != "random":
            log(f"  {'':9s} {len(s['fresh'])} leaves fresh (LoRA adapters / kontext queries)")
        if s["unused"]:
            log(f"  {'':9s} {len(s['unused'])} tensors of the folder unused, e.g. {s['unused'][:3]}")
    total = sum(summary[c]["bytes"] for c in COMPONENTS)
    meta = dict(stage=int(config.get("stage", 0)), step=0, imported={c: summary[c]["source"] for c in COMPONENTS},
                dtype=np_dtype.name)
    # The Qwen folder's tokenizer goes with the weights (``<out>/tokenizer``): what the model's prompts must read.
    files = processors.tokenizer_files(qwen, f"{processors.TOKENIZER_DIR}/")
    if not files:
        log(f"  note: {qwen} holds no tokenizer files; set config.vlm.tokenizer to Qwen2.5-VL's tokenizer folder")
    saved_model.save_model(out, config, params, meta=meta, files=files)
    log(f"wrote {out}: {total:,d} bytes in {np_dtype.name}")
    return summary


# ----------------------------------------------------------------------------------------------------------
# Export: model checkpoint -> folders
# ----------------------------------------------------------------------------------------------------------


def kontext_tensors(params: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """``kontext_queries`` ``[K, hidden]`` and the connector in torch layout, in the params' dtype."""
    out = {QUERIES: np.asarray(params["vlm"][QUERIES])}
    connector = flatten(params["connector"])
    for ours, theirs, transposed in CONNECTOR_TENSORS:
        if ours not in connector and ours.startswith("pooled_proj/"):
            continue
        array = np.asarray(connector[ours])
        out[theirs] = np.ascontiguousarray(array.T if transposed else array)
    return out


def kontext_config(config: Any, model_config: QueryKontextConfig) -> dict[str, Any]:
    """``kontext_config.json``: what the transformers/diffusers folders do not say."""
    c = model_config
    kind = processors.tokenizer_kind(config.vlm)
    return dict(
        stage=int(config.get("stage", 0)),
        # 'qwen': vlm/ holds the Qwen2.5-VL tokenizer the model was trained with; 'byte' / 'word': a stand-in
        # (the README says how it tokenises; 'word' lists its vocabulary here).
        tokenizer=kind,
        vocabulary=list(config.vlm.vocabulary) if kind == "word" else None,
        num_queries=c.vlm.num_queries,
        query_attention=c.vlm.query_attention,
        max_text_tokens=int(config.vlm.get("max_text_tokens", 0)) or None,
        conditioning=c.conditioning,
        placement=c.placement,
        source_offset=c.source_offset,
        connector=dict(in_features=c.connector.in_features, hidden_features=c.connector.hidden_features,
                       out_features=c.connector.out_features, act="gelu_exact",
                       pooled_features=c.connector.pooled_features),
        # The MMDiT's guidance-embedding input (FLUX.1-dev layouts): this constant, in training and sampling.
        distilled_guidance=c.distilled_guidance if c.mmdit.guidance_embeds else None,
        in_context=c.in_context,
        max_references=c.max_references,
        # 'sincos': SD3's 2D embedding of each image token's (row, col) id, added to x_embedder's output (the
        # exported FluxTransformer2DModel does not add it; see the README).
        pos_embed=c.mmdit.pos_embed,
        flow=dataclasses.asdict(c.flow),
        vae=dict(scaling_factor=c.vae.scaling_factor, shift_factor=c.vae.shift_factor,
                 downsample_factor=c.vae.downsample_factor, latent_channels=c.vae.latent_channels, pack=2),
        lora_merged=dict(vlm_alpha=c.vlm.lora.alpha if c.vlm.lora.rank else None,
                         mmdit_alpha=c.mmdit_lora.alpha if c.mmdit_lora.rank else None),
        srope=dict(text=[0, 0, 0], kontext=[0, 0, 0], target="(0, r, c)",
                   source="(1, r, c)" if c.source_offset == "axis0" else "(0, -r, -c)",
                   reference_n="(0, r + h*n, c + w*n), n = 1..N", order="source, target, reference_1..N"),
    )


POS_EMBED_README = """
**Absolute position embedding (`pos_embed: "sincos"` in `kontext_config.json`).** This MMDiT also adds SD3's 2D
sin-cos embedding of every image token's ids to the output of `transformer.x_embedder`, which
`FluxTransformer2DModel` does not do by itself: add
`diffusers.models.embeddings.get_2d_sincos_pos_embed_from_grid(inner_dim, grid)` with `grid = [col, row]` of each
token's `img_ids` (the first axis is not embedded; `inner_dim` = heads x head dim), for instance with a forward
hook on `x_embedder` (`torch_reference.py` does).
"""

TOKENIZER_README = dict(
    qwen="""
**Tokenizer.** `vlm/` holds the Qwen2.5-VL tokenizer the model was trained with
(`transformers.AutoTokenizer.from_pretrained("vlm")`); prompts were wrapped in Qwen's chat format (a system turn
"You are a helpful assistant.", the user turn with the prompt, an open assistant turn), as its chat template does.
""",
    byte="""
**Tokenizer: a stand-in, not Qwen's.** This model was trained from scratch with one token per UTF-8 byte
(no chat format); `vlm/` has no tokenizer files, so `AutoTokenizer` cannot load one: build the ids yourself,
`input_ids = [b % {first_special} for b in prompt.encode("utf-8")]`.
""",
    word="""
**Tokenizer: a stand-in, not Qwen's.** This model was trained from scratch with a closed word vocabulary
(`vocabulary` in `kontext_config.json`): the lower-cased prompt split into words and punctuation marks (regex
`\\w+|[^\\w\\s]`), word i of the vocabulary is id i + 1 and any other word id 0; no chat format. `vlm/` has no
tokenizer files, so `AutoTokenizer` cannot load one.
""",
)

EXPORT_README = """\
# Query-Kontext, exported from qk_jax

Stage {stage} model. How the pieces fit (paper arXiv:2509.26641, section 3.1, figure 2);
`qk_jax/convert/torch_reference.py` is this description as runnable torch code
(`KontextPipeline.from_exported(this_folder)`).

| path | what | loads with |
|---|---|---|
| `vlm/` | Qwen2.5-VL (LoRA merged) | `transformers.Qwen2_5_VLForConditionalGeneration.from_pretrained` |
| `transformer/` | FLUX-layout MMDiT (LoRA merged) | `diffusers.FluxTransformer2DModel.from_pretrained` |
| `vae/` | the autoencoder | `diffusers.AutoencoderKL.from_pretrained` |
| `kontext.safetensors` | query embeddings and connector weights (below) | `safetensors.torch.load_file` |
| `kontext_config.json` | the settings below | `json` |

`kontext.safetensors`: `kontext_queries` [K={num_queries}, {hidden}];
`connector.linear_1.weight` [{conn_hidden}, {hidden}], `connector.linear_1.bias`,
`connector.linear_2.weight` [{conn_out}, {conn_hidden}], `connector.linear_2.bias`{pooled_tensors} (torch `nn.Linear`
layout: weight [out, in]).

{tokenizer}
## Conditioning (VLM -> connector)

1. Tokenise the prompt with its images as Qwen2.5-VL does (`<|vision_start|>`, one `<|image_pad|>` per merged patch,
   `<|vision_end|>`); place the ViT's image features on the image-pad embeddings (`inputs_embeds`).
2. Append the K kontext query embeddings **after** the prompt (after its padding, if padded), with attention mask 1.
   Their M-RoPE position ids continue the prompt: if the prompt's largest position id (over its valid tokens, all
   three axes) is `p`, the queries get `p+1, ..., p+K` on all three axes. Attention stays causal
   (`query_attention={query_attention}`).
3. Run the language model; take the final-norm hidden states (`last_hidden_state`): `T` = the prompt's valid
   non-image tokens (text), `Q` = the last K positions (queries).
4. Connector (shared weights): `connector(x) = linear_2(GELU_exact(linear_1(x)))`
   ({conn_in} -> {conn_hidden} -> {conn_out}).
5. The MMDiT's text stream (`encoder_hidden_states`), conditioning `{conditioning}`: **text tokens first, then the
   kontext tokens**: `context = [connector(T_prompt); connector(Q)]`, where `T_prompt` is the whole prompt
   (length S, image and padding positions included) and the text padding mask is False at every prompt position
   that is padding or an image pad, True at text tokens and at all K queries. Masked context tokens must be
   masked out of attention as keys (or simply dropped, which is equivalent for the image tokens).
   `pooled_projections` = the mean of `connector(Q)` over the K queries{pooled_proj}.{guidance}

## Image stream and sRoPE (in-context inputs, stage 3)

Images are VAE-encoded (posterior mean), normalised `z = (latent - {shift}) * {scale}` (`shift_factor`,
`scaling_factor`), and packed 2x2 into tokens (FLUX packing): a latent of h x w tokens. Every in-context image of a
sample has the target's size. The image stream is the concatenation, in this order:

    source (at most one) | noisy target | reference 1 | ... | reference N   (N <= {max_references})

with the position ids (`img_ids`, 3 axes; `axes_dims_rope` of the transformer config):

| token | position id |
|---|---|
| text and kontext tokens (`txt_ids`) | (0, 0, 0) |
| target at latent row r, column c | (0, r, c) |
| source | (0, -r, -c) |
| n-th reference (n = 1..N) | (0, r + h*n, c + w*n) |

diffusers' `FluxTransformer2DModel` takes ids shared by the batch: run samples with different layouts one at a
time. The velocity is the transformer's output at the target block's positions.
{pos_embed}
## With a stock diffusers pipeline

Text-to-image runs in diffusers' own `FluxPipeline` once the conditioning is computed (steps 1-5 above, e.g.
`cond = KontextPipeline.from_exported(this_folder).condition(input_ids, attention_mask)`), one prompt at a time:

```python
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
flow = settings["flow"]  # kontext_config.json
scheduler = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, base_shift=flow["base_shift"],
    max_shift=flow["max_shift"], base_image_seq_len=flow["base_seq_len"], max_image_seq_len=flow["max_seq_len"])
pipe = FluxPipeline(scheduler=scheduler, vae=AutoencoderKL.from_pretrained("vae"),
                    transformer=FluxTransformer2DModel.from_pretrained("transformer"),
                    text_encoder=None, tokenizer=None, text_encoder_2=None, tokenizer_2=None)
image = pipe(prompt_embeds=cond.context[:, cond.context_mask[0]], pooled_prompt_embeds=cond.pooled,
             height=512, width=512, num_inference_steps=28).images[0]
```

From the same latents this is byte for byte the image of `KontextPipeline.sample` + `decode` (tested in qk_jax,
`tests/test_torch_reference.py`); it has no classifier-free guidance unless you pass `true_cfg_scale` and the
unconditional embeddings (an empty prompt through steps 1-5). `FluxKontextPipeline` places its source image at
`(1, r, c)`: it can run this model's edits only if `source_offset` is `"axis0"` and `pos_embed` is `"none"`
(`kontext_config.json`); the paper's `(0, -r, -c)` source and in-context references need `torch_reference.py`.

## Sampling

Rectified flow, `x_t = (1 - t) x_0 + t noise`, the network predicts `v = noise - x_0`; `timestep` is t in [0, 1]
(the transformer multiplies by 1000). Euler from t=1 to t=0 on FLUX's shifted schedule,
`t' = e^mu / (e^mu + (1/t - 1))`, `mu` linear in the target's token count from `base_shift` at `base_seq_len`
to `max_shift` at `max_seq_len` (`flow` in `kontext_config.json`). Decode with the VAE after unpacking and
`latent = z / {scale} + {shift}`.
"""


def _pooled_readme(mc: QueryKontextConfig) -> dict[str, str]:
    """The README's lines on ``pooled_proj`` (FLUX.1's pooled width) and the guidance input (FLUX.1-dev)."""
    width = mc.connector.pooled_features
    return dict(
        pooled_tensors=(f", `connector.pooled_proj.weight` [{width}, {mc.connector.out_features}],"
                        " `connector.pooled_proj.bias`" if width else ""),
        pooled_proj=(f", mapped by `connector.pooled_proj` to the transformer's pooled width ({width})"
                     if width else ""),
        guidance=(f"\n   The transformer embeds a guidance value (`guidance_embeds`): give `guidance ="
                  f" {mc.distilled_guidance:g}` for every sample (`distilled_guidance` in `kontext_config.json`);"
                  "\n   the model was trained with it held there, and classifier-free guidance does the guiding."
                  if mc.mmdit.guidance_embeds else ""))


def export_model(checkpoint: str | os.PathLike, out: str | os.PathLike, *, log: Log = print) -> Path:
    """Write the model checkpoint ``checkpoint`` (``save_model`` layout) as the folders of the module doc."""
    config, params, meta = saved_model.load_model(checkpoint)
    model_config = QueryKontextConfig.from_config(config)
    missing = [c for c in COMPONENTS if c not in params]
    if missing:
        raise CheckpointError(f"{checkpoint}: params lack {missing}; expected the components {COMPONENTS}")
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"{out} exists and is not empty; choose a new directory for the export")
    out.mkdir(parents=True, exist_ok=True)
    mc = model_config
    log(f"exporting the VLM to {out / VLM_DIR}" + (f" (LoRA merged, alpha {mc.vlm.lora.alpha})" if mc.vlm.lora.rank
                                                   else ""))
    hf_qwen_vl.export(mc.vlm, params["vlm"], out / VLM_DIR)
    log(f"exporting the MMDiT to {out / TRANSFORMER_DIR}" + (f" (LoRA merged, alpha {mc.mmdit_lora.alpha})"
                                                             if mc.mmdit_lora.rank else ""))
    diffusers_mmdit.export(mc.mmdit, params["mmdit"], out / TRANSFORMER_DIR, lora_alpha=mc.mmdit_lora.alpha,
                           allow_pos_embed=True)  # kontext_config.json and the README say how to add it
    log(f"exporting the VAE to {out / VAE_DIR}")
    diffusers_vae.export(mc.vae, params["vae"], out / VAE_DIR)
    kind = processors.tokenizer_kind(config.vlm)
    own = os.path.join(checkpoint, processors.TOKENIZER_DIR)
    if kind == "qwen":
        source = own if processors.is_tokenizer_folder(own) else processors.tokenizer_folder(config)
        for name, path in processors.tokenizer_files(source).items():
            (out / VLM_DIR / name).write_bytes(Path(path).read_bytes())
        log(f"copied the tokenizer of {source} into {out / VLM_DIR}")
    tensors = kontext_tensors(params)
    write_safetensors(tensors, out, Path(KONTEXT_WEIGHTS).stem)
    settings = kontext_config(config, mc)
    (out / KONTEXT_CONFIG).write_text(json.dumps(settings, indent=2))
    c = mc.connector
    (out / README).write_text(EXPORT_README.format(
        stage=settings["stage"], num_queries=mc.vlm.num_queries, hidden=mc.vlm.text.hidden_size,
        conn_in=c.in_features, conn_hidden=c.hidden_features, conn_out=c.out_features,
        query_attention=mc.vlm.query_attention, conditioning=mc.conditioning, max_references=mc.max_references,
        scale=mc.vae.scaling_factor, shift=mc.vae.shift_factor,
        pos_embed=POS_EMBED_README if mc.mmdit.pos_embed == "sincos" else "",
        tokenizer=TOKENIZER_README[kind].format(first_special=mc.vlm.text.bos_token_id),
        **_pooled_readme(mc)))
    log(f"wrote {out}: {VLM_DIR}/, {TRANSFORMER_DIR}/, {VAE_DIR}/, {KONTEXT_WEIGHTS}, {KONTEXT_CONFIG}, {README}")
    return out


__all__ = ["import_model", "export_model", "kontext_tensors", "kontext_config", "CONNECTOR_TENSORS", "COMPONENTS"]
