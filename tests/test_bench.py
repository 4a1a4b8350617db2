"""qk_jax.bench: the analytic FLOP counts against the matmuls of the traced programs, and the CLI's JSON lines."""

import dataclasses
import json
import math
import os
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import pytest

from configs import stage2
from qk_jax import bench
from qk_jax.models.mmdit import MMDiT, MMDiTConfig
from qk_jax.models.qwen_vl import QwenVL, QwenVLConfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _dot_flops(jaxpr) -> int:
    """2 x multiply-adds of every ``dot_general`` in a jaxpr, sub-jaxprs included (a scan's body times its length)."""
    total = 0
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "dot_general":
            (lhs_contract, _), _ = eqn.params["dimension_numbers"]
            lhs = eqn.invars[0].aval.shape
            total += 2 * math.prod(eqn.outvars[0].aval.shape) * math.prod(lhs[d] for d in lhs_contract)
        times = eqn.params.get("length", 1) if eqn.primitive.name == "scan" else 1
        for param in eqn.params.values():
            for sub in param if isinstance(param, (tuple, list)) else (param,):
                inner = getattr(sub, "jaxpr", sub)
                if hasattr(inner, "eqns"):
                    total += times * _dot_flops(inner)
    return total


def _mmdit_config(**changes):
    mmdit = dict(stage2.get_config("tiny").mmdit)
    mmdit.pop("lora")
    return dataclasses.replace(MMDiTConfig.from_config(mmdit), **changes)


def test_llm_flops_equal_the_traced_matmuls():
    config = stage2.get_config("tiny")
    vlm = QwenVLConfig.from_config(config.vlm)
    model = QwenVL(vlm)
    ids = jnp.zeros((2, 7), jnp.int32)
    params = nn.meta.unbox(jax.eval_shape(model.init, jax.random.key(0), ids))
    jaxpr = jax.make_jaxpr(lambda p, i: model.apply(p, i).hidden_states)(params, ids).jaxpr
    assert bench.llm_forward_flops(vlm.text, 2, 7 + vlm.num_queries) == _dot_flops(jaxpr)


def test_cli_prints_jax_and_torch_lines():
    """The three measurements at tiny dims on CPU, diffusers beside the MMDiT ones (eager: torch.compile on 2
    CPU cores takes minutes)."""
    cmd = [sys.executable, "-m", "qk_jax.bench", "--config", "configs/stage2.py:tiny", "--what", "mmdit_train",
           "--what", "sample", "--what", "vlm_forward", "--batch", "2", "--image-tokens", "16", "--text-tokens", "8",
           "--steps", "2", "--warmup", "1", "--torch", "--notorch-compile", "--peak-tflops", "1.0"]
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300, check=True).stdout
    lines = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    assert [(r["what"], r["framework"]) for r in lines] == [
        ("mmdit_train", "jax"), ("mmdit_train", "torch"), ("sample", "jax"), ("sample", "torch"), ("vlm_forward", "jax")]
    for r in lines:
        assert r["step_s"] > 0 and r["images_per_s"] == pytest.approx(2 / r["step_s"], rel=1e-2)
        assert r["mfu"] == pytest.approx(r["tflops"] / 1.0, abs=1e-3)
    train_jax, train_torch = lines[0], lines[1]
    cfg = _mmdit_config()
    assert train_jax["flops_per_step"] == train_torch["flops_per_step"] == 3 * bench.mmdit_forward_flops(cfg, 2, 16, 8)
    assert train_jax["params"] == sum(math.prod(p.shape) for p in jax.tree.leaves(
        jax.eval_shape(MMDiT(cfg).init, jax.random.key(0), **{k: jnp.asarray(v) for k, v in bench.mmdit_inputs(
            cfg, bench.Shape(1, 4, 2)).items() if k != "target"})))
    assert train_torch["jax_over_torch"] == pytest.approx(train_torch["step_s"] / train_jax["step_s"], rel=1e-2)
    assert train_jax["memory_source"] == "compiled" and train_jax["peak_memory_gb"] > 0
    assert train_jax["attention"] == "xla"  # cuDNN only on a GPU


def test_bench_config_is_a_paper_block_at_1_4b():
    config = stage2.get_config("bench")
    assert config.mmdit.num_attention_heads * config.mmdit.attention_head_dim == 2560
    from qk_jax.models.mmdit import param_count

    mmdit = dict(config.mmdit)
    mmdit.pop("lora")
    assert param_count(MMDiTConfig.from_config(mmdit)) == 1_456_365_120
    assert config.compute_dtype == "bfloat16" and config.remat == "none"
