"""The planner (``qk_jax.parallel.planner``): exact MMDiT matmul FLOPs, residual constants, a tiny step's
compiled memory, the paper stage-2 plan; and its command, ``python -m qk_jax.plan``."""

import dataclasses
import json
import math

import jax
import jax.extend
import jax.numpy as jnp
import pytest
from jax._src.ad_checkpoint import saved_residuals

from configs import stage1, stage2, stage3
from qk_jax import plan as plan_command
from qk_jax.models import mmdit as mmdit_lib
from qk_jax.models.query_kontext import QueryKontextConfig
from qk_jax.parallel import mesh as mesh_lib
from qk_jax.parallel import planner
from qk_jax.training import loop

QUERIES_PAPER = 128 * 3584  # kontext queries live in the VLM's params


def _dot_flops(jaxpr) -> int:
    """2 x MACs of every dot_general in a (closed) jaxpr, recursing into sub-jaxprs."""
    total = 0
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "dot_general":
            (lc, _), (lb, _) = eqn.params["dimension_numbers"]
            a, b = (v.aval.shape for v in eqn.invars)
            out = eqn.outvars[0].aval.shape
            total += 2 * math.prod(out) * math.prod(a[d] for d in lc)
        times = eqn.params["length"] if eqn.primitive.name == "scan" else 1  # a scanned block runs `length` times
        for sub in jax.extend.core.jaxprs_in_params(eqn.params):
            total += times * _dot_flops(sub)
    return total


@pytest.mark.parametrize("stage,changes", [(stage2, {}), (stage3, {}),
                                           (stage2, dict(guidance_embeds=True, num_single_layers=2, scan=True))],
                         ids=["stage2", "stage3_lora", "guidance_single_scanned"])
def test_mmdit_matmul_flops_are_exact(stage, changes):
    """Every dense (LoRA too, stage 3) and both attention matmuls, counted from the traced forward pass (a
    scanned stack counted once per layer)."""
    config = stage.get_config("tiny")
    qk = QueryKontextConfig.from_config(config)
    lora = qk.mmdit_lora if qk.mmdit_lora.rank else None
    changes = dict(changes)
    scan = changes.pop("scan", False)
    cfg = dataclasses.replace(qk.mmdit, **changes)
    batch, img, txt, target = 2, 12, 5, 4
    model = mmdit_lib.MMDiT(cfg, lora=lora, scan_layers=scan)
    inputs = mmdit_lib.init_inputs(cfg, batch=batch, img_len=img, text_len=txt)
    params = model.init(jax.random.key(0), **inputs)
    jaxpr = jax.make_jaxpr(lambda p: model.apply(p, **inputs, target_start=jnp.zeros((batch,), jnp.int32),
                                                  target_len=target))(params)
    counted = planner.mmdit_matmul_flops(cfg, batch, img, txt, target, lora)
    assert sum(counted.values()) == _dot_flops(jaxpr.jaxpr)
    assert (counted["lora"] > 0) == (lora is not None)
    if lora is None:
        assert planner.mmdit_train_flops(cfg, batch, img, txt, target) == 3 * sum(counted.values())


@pytest.mark.parametrize("kind", ["double", "single"])
def test_block_residual_constants(kind):
    """The per-token constants of the module docstring against JAX's saved residuals of one block."""
    cfg = mmdit_lib.MMDiTConfig(num_layers=1, num_single_layers=0, num_attention_heads=4, attention_head_dim=32,
                                axes_dims_rope=(8, 12, 12))
    block_cls, constants = {"double": (mmdit_lib.DoubleStreamBlock, planner.MMDIT_DOUBLE_BYTES),
                            "single": (mmdit_lib.SingleStreamBlock, planner.MMDIT_SINGLE_BYTES)}[kind]
    b, s, l, d = 3, 64, 32, cfg.inner_dim
    for dtype, c in ((jnp.float32, 4), (jnp.bfloat16, 2)):
        block = block_cls(cfg, dtype=dtype)
        x, ctx = jnp.zeros((b, s, d), dtype), jnp.zeros((b, l, d), dtype)
        temb, cos, mask = jnp.zeros((b, d), dtype), jnp.zeros((b, l + s, 32)), jnp.ones((b, l + s), bool)
        found = {}

        def outer(x, ctx):
            params = block.init(jax.random.key(0), x, ctx, temb, cos, cos, mask)
            f = lambda p, x, ctx: sum(o.astype(jnp.float32).sum()
                                      for o in jax.tree.leaves(block.apply(p, x, ctx, temb, cos, cos, mask)))
            found["r"] = saved_residuals(f, params, x, ctx)  # trained weights: their inputs are kept too
            return 0

        jax.eval_shape(outer, x, ctx)
        # Per-sample residuals (leading batch dim), without the attention's [.., T, T] ones (counted apart).
        per_token = sum(a.size * a.dtype.itemsize for a, why in found["r"]
                        if "argument" not in why and a.ndim >= 2 and a.shape[0] == b
                        and a.shape[-2:] != (l + s, l + s))
        per_token /= b * (s + l) * d
        assert per_token == pytest.approx(constants[c], rel=0.05), (dtype, per_token)


def test_tiny_step_memory_matches_compiled():
    """Planned total vs XLA's compiled memory of the real train step, as ``python -m qk_jax.plan --compile`` prints
    them: arguments + outputs - aliased (the donated state) + temporaries of ``loop.compile_step`` on this host's
    CPU device (float32, XLA attention), for the tiny stage 2's worst bucket (one VLM image); planned = params +
    grads + optimizer + compute copy + activations (attention='xla') + batch on the same 1-device mesh. Compiled
    from shapes, nothing allocated. The stored state's bytes (params + optimizer) are the planner's within 5%."""
    rows = plan_command.main(["--config", "configs/stage2.py:tiny", "--devices", "1", "--device-memory", "1GB",
                              "--attention", "xla", "--compile", "--json"])
    compiled = json.loads(rows[-1])
    assert compiled["devices"] == 1 and compiled["topology"] == "local"
    assert compiled["planned_bytes"] == pytest.approx(compiled["compiled_bytes"], rel=0.2), compiled

    config = stage2.get_config("tiny")
    state = loop.layout(config, mesh_lib.make_mesh(config.mesh)).abstract
    planned = planner.Planner(config, "stage2:tiny").plan((1, 1, 1), 1e12, attention="xla")
    state_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(state))
    assert planned.params + planned.optimizer == pytest.approx(state_bytes, rel=0.05)


def test_compile_for_a_tpu_topology_needs_libtpu_or_says_so():
    """``--topology`` names a TPU slice; without libtpu (CI) the command says what to install, in one line."""
    try:
        mesh_lib.topology_devices("v5p:2x2x2")
    except ValueError as e:
        assert "pip install libtpu" in str(e) and "v5p:2x2x2" in str(e)
    with pytest.raises(ValueError, match="no TPU topology 'v5p-16'"):
        mesh_lib.topology_devices("v5p-16")


@pytest.fixture(scope="module")
def paper_stage2():
    return planner.Planner(stage2.get_config(), "stage2")


def test_paper_parameter_counts(paper_stage2):
    counts = paper_stage2.counts
    assert counts["vlm"] - QUERIES_PAPER == 8_292_166_656
    assert counts["mmdit"] == 9_952_604_736
    assert counts["trainable"] == counts["mmdit"] + counts["connector"] + QUERIES_PAPER
    light = mmdit_lib.MMDiTConfig.from_config({k: v for k, v in stage1.get_config().mmdit.items()})
    assert mmdit_lib.param_count(light) == 867_713_600


def test_paper_stage2_on_192_h100s(paper_stage2):
    """Without remat stage 2 fits 192 x 80 GB only by accumulating micro-batches of 1; on a 192 x 1 data axis
    ZeRO cannot shard the MMDiT's 2560/10240-wide leaves (192 = 2^6 x 3 divides none), so it does not fit with
    remat either; the planner finds data x fsdp = 64 x 3, where zero_spec shards every big leaf 64 ways, and with
    block remat the per-device batch fits in one micro-step."""
    memory = planner.parse_memory("80GB")
    plain = paper_stage2.best(192, memory, remat="none")
    assert plain.fits and plain.micro_batch == 1 and plain.grad_accum_steps == plain.batch_per_device > 1
    assert not paper_stage2.plan((192, 1, 1), memory, remat="full").fits
    fixed = paper_stage2.best(192, memory, remat="full")
    assert fixed.fits and fixed.devices == 192 and fixed.mesh[0] % 64 == 0 and fixed.grad_accum_steps == 1
    # ZeRO-2 really shards the gradients and the float32 masters; the whole copy the step gathers is bf16.
    mmdit = paper_stage2.counts["mmdit"]
    assert fixed.grads < 0.05 * 4 * paper_stage2.counts["trainable"]
    assert fixed.params < 2 * paper_stage2.counts["vlm"] + 0.05 * 4 * mmdit
    assert fixed.compute_copy == pytest.approx(2 * mmdit, rel=0.01)
    assert fixed.batch_per_device == math.ceil(1024 / (fixed.mesh[0] * fixed.mesh[1]))
    assert fixed.micro_batch * fixed.grad_accum_steps >= fixed.batch_per_device
    text = planner.format_plan(fixed, paper_stage2.smallest(memory, remat="full", zero="even"))
    assert "FITS in 80 GB" in text and "smallest mesh that fits" in text
    # 6 N D for the trained MMDiT is most of the step's model FLOPs.
    w = paper_stage2.work
    assert paper_stage2.flops_per_sample > planner.mmdit_train_flops(paper_stage2.qk.mmdit, 1, w.image_tokens,
                                                                  w.text_tokens)


def test_cli_prints_a_plan(capsys):
    lines = plan_command.main(["--config", "configs/stage2.py:tiny", "--devices", "4", "--device-memory", "1GB",
                               "--mesh", "4,1,1"])
    assert "stage2:tiny" in lines[0] and "FITS in 1 GB" in lines[0]
    rows = plan_command.main(["--config", "configs/stage3.py:tiny", "--devices", "2", "--device-memory", "1GB",
                              "--json"])
    import json
    row = json.loads(rows[0])
    assert row["fits"] and row["devices"] == 2 and row["flops_per_step"] > 0
    with pytest.raises(Exception, match="--mesh"):
        plan_command.main(["--config", "configs/stage2.py:tiny", "--devices", "4", "--mesh", "4,1"])


def test_cli_is_the_library():
    """The command's lines are ``planner.run`` formatted by ``format_plan`` / ``format_json``; the dashed flags
    reach it as they are written (no rewriting)."""
    lines = plan_command.main(["--config", "configs/stage2.py:tiny", "--devices", "2", "--device-memory", "2GB",
                               "--peak-tflops", "100", "--json"])
    ((p, smallest),) = planner.run([("stage2:tiny", stage2.get_config("tiny"))], 2, 2e9, None,
                                    peak_tflops=100.0)
    assert lines == [planner.format_json(p, smallest)]


def test_communication_of_a_zero2_step(paper_stage2):
    """Ring volumes per device: the float32 gradients of every trainable leaf outside the VLM reduce-scattered
    whole (4 B x their count x (Z-1)/Z), their compute copy gathered; the VLM's tensor-parallel activations only
    when tensor > 1; the time at the data axes' inter-node bandwidth when the mesh spans nodes."""
    memory = planner.parse_memory("80GB")
    zero_leaves = sum(math.prod(shape) for component, _, shape, _, trainable, _ in paper_stage2.leaves
                      if trainable and component != "vlm")
    p = paper_stage2.plan((64, 3, 1), memory, remat="full", micro=6)
    ring = 191 / 192
    assert p.comm_bytes["zero_reduce_scatter"] == pytest.approx(4 * zero_leaves * ring)
    assert 2 * zero_leaves * ring < p.comm_bytes["zero_all_gather"] < 2.01 * zero_leaves * ring  # bf16 kernels
    assert p.comm_bytes["tensor_all_reduce"] == 0
    link = planner.INTERCONNECTS["h100-ib"]
    assert p.comm_time_s == pytest.approx(sum(p.comm_bytes.values()) / link.inter)
    assert p.time_per_step_s == pytest.approx(p.compute_time_s + p.comm_time_s)
    tp = paper_stage2.plan((48, 1, 4), memory, remat="full", micro=6)
    assert tp.comm_bytes["tensor_all_reduce"] > 0
    # The paper's 48 x 1 x 4 repeats the MMDiT on every device of a tensor group: a device does 22 samples'
    # MMDiT work (1056 / 48) where one of 64 x 3 x 1 does 6, and only the VLM's share is split four ways.
    assert tp.batch_per_device == 22 and tp.compute_time_s > 2.5 * p.compute_time_s
    node = paper_stage2.plan((8, 1, 1), 1e12, micro=1, global_batch=8)
    assert node.comm_time_s == pytest.approx(sum(node.comm_bytes.values()) / link.intra)


@pytest.mark.parametrize("stage", ["stage1", "stage3", "stage3b"])
def test_every_paper_stage_fits_192_h100s_with_the_mmdit_split_over_every_axis(stage):
    """The planner's layout for 192 x 80 GB fits, on every device, and a tensor axis, if any, splits the MMDiT's
    rows too (a micro-batch it divides: ``split_rows``), so no device repeats the MMDiT's work; stage 2's is
    ``test_paper_stage2_on_192_h100s``'s."""
    config = dict(planner.paper_configs())[stage]
    plan = planner.Planner(config, stage)
    p = plan.best(192, planner.parse_memory("80GB"), remat="full")
    assert p.fits and p.devices == 192, (p.mesh, p.total)
    assert p.mesh[2] == 1 or plan._rows_over_tensor(p.micro_batch, p.mesh[2]), (p.mesh, p.micro_batch)
