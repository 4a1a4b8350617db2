"""qk_jax.perf.benchmark: the analytic FLOP counts against the matmuls of the traced programs, and the JSON lines of
its command, python -m qk_jax.bench."""

import dataclasses
import glob
import gzip
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
from qk_jax.perf import benchmark
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
    assert benchmark.llm_forward_flops(vlm.text, 2, 7 + vlm.num_queries) == _dot_flops(jaxpr)


def test_cli_prints_jax_and_torch_lines(tmp_path):
    """The three measurements at tiny dims on CPU, diffusers beside the MMDiT ones (eager: torch.compile on 2
    CPU cores takes minutes), each JAX one profiled (a CPU trace has no device kernels: an empty summary)."""
    cmd = [sys.executable, "-m", "qk_jax.bench", "--config", "configs/stage2.py:tiny", "--what", "mmdit_train",
           "--what", "sample", "--what", "vlm_forward", "--batch", "2", "--image-tokens", "16", "--text-tokens", "8",
           "--steps", "2", "--warmup", "1", "--torch", "--notorch-compile", "--peak-tflops", "1.0", "--profile", str(tmp_path)]
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300, check=True).stdout
    lines = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    assert [(r["what"], r["framework"]) for r in lines] == [
        ("mmdit_train", "jax"), ("mmdit_train", "torch"), ("sample", "jax"), ("sample", "torch"), ("vlm_forward", "jax")]
    for r in lines:
        assert r["step_s"] > 0 and r["images_per_s"] == pytest.approx(2 / r["step_s"], rel=1e-2)
        assert r["mfu"] == pytest.approx(r["tflops"] / 1.0, abs=1e-3)
    train_jax, train_torch = lines[0], lines[1]
    cfg = _mmdit_config()
    assert train_jax["flops_per_step"] == train_torch["flops_per_step"] == \
        3 * benchmark.mmdit_forward_flops(cfg, 2, 16, 8)
    assert train_jax["params"] == sum(math.prod(p.shape) for p in jax.tree.leaves(
        jax.eval_shape(MMDiT(cfg).init, jax.random.key(0), **{k: jnp.asarray(v) for k, v in benchmark.mmdit_inputs(
            cfg, benchmark.Shape(1, 4, 2)).items() if k != "target"})))
    assert train_torch["jax_over_torch"] == pytest.approx(train_torch["step_s"] / train_jax["step_s"], rel=1e-2)
    assert train_jax["memory_source"] == "compiled" and train_jax["peak_memory_gb"] > 0
    assert train_jax["attention"] == "xla"  # cuDNN only on a GPU
    # Forward + backward alone (no optimizer): its MFU counts the step's FLOPs over its own time.
    assert 0 < train_jax["fwd_bwd_s"] and train_jax["fwd_bwd_mfu"] == pytest.approx(
        train_jax["flops_per_step"] / train_jax["fwd_bwd_s"] / 1e12, rel=1e-2, abs=1e-4)
    assert train_jax["bytes_accessed"] > 0 and train_jax["fusions"] > 0
    assert train_jax["fp8"] is False and train_jax["fp8_gemms"] == 0  # cuBLASLt's fp8 GEMMs only on a GPU
    for what in ("mmdit_train", "sample", "vlm_forward"):
        assert glob.glob(str(tmp_path / what / "plugins" / "profile" / "*" / "*.trace.json.gz"))
    assert [r.get("profile") for r in lines] == [{}, None, {}, None, {}]


def test_bf16_sampling_runs_on_both_frameworks():
    """In bf16 (the paper and bench configs) the diffusers sampling step takes the conditioning in the model's
    dtype: its float32 context once met bf16 weights in the first projection (found on an H100)."""
    config = stage2.get_config("tiny")
    config.compute_dtype = "bfloat16"
    ours, theirs = benchmark.run(config, "sample", benchmark.Shape(2, 16, 8), warmup=1, steps=1, with_torch=True,
                                 torch_compile=False)
    assert (ours["framework"], ours["dtype"], theirs["framework"]) == ("jax", "bfloat16", "torch")
    assert theirs["step_s"] > 0


def test_guidance_scales_come_from_the_config():
    """The config's sample block is the one home of the guidance scales: no defaults of the benchmark's own."""
    config = stage2.get_config("tiny")
    config.sample.cfg_text, config.sample.cfg_image = 2.5, 0.5
    assert benchmark.guidance_scales(config) == (2.5, 0.5)
    del config["sample"]
    with pytest.raises(ValueError, match="no sample block"):
        benchmark.guidance_scales(config)


def test_bench_config_is_a_paper_block_at_1_4b():
    config = stage2.get_config("bench")
    assert config.mmdit.num_attention_heads * config.mmdit.attention_head_dim == 2560
    from qk_jax.models.mmdit import param_count

    mmdit = dict(config.mmdit)
    mmdit.pop("lora")
    assert param_count(MMDiTConfig.from_config(mmdit)) == 1_456_365_120
    assert config.compute_dtype == "bfloat16" and config.remat == "none"


def _write_trace(log_dir, events):
    folder = log_dir / "plugins" / "profile" / "2026_11_27_00_00_00"
    folder.mkdir(parents=True)
    with gzip.open(folder / "host.trace.json.gz", "wt") as f:
        json.dump({"displayTimeUnit": "ns", "metadata": {}, "traceEvents": events}, f)


def _meta(kind, pid, name, tid=None):
    return dict(ph="M", pid=pid, name=kind, args=dict(name=name), **({} if tid is None else {"tid": tid}))


def test_summarize_trace_reads_the_gpu_streams(tmp_path):
    """The profile summary against hand sums of a Chrome trace laid out as jax.profiler writes one on a GPU:
    kernels on the device's Stream thread; XLA Ops (the same time again) and host events ignored."""
    kernel = lambda name, dur, tid=10, pid=1: dict(ph="X", pid=pid, tid=tid, ts=0, dur=dur, name=name)  # noqa: E731
    _write_trace(tmp_path, [
        _meta("process_name", 1, "/device:GPU:0"), _meta("process_name", 2, "/host:CPU"),
        _meta("thread_name", 1, "Stream #10(Compute)", 10), _meta("thread_name", 1, "XLA Ops", 11),
        _meta("thread_name", 2, "python", 5),
        kernel("nvjet_sm90_tst_320x128_64x3_1x2_h_bz_coopB_NTT", 400), kernel("nvjet_sm90_tst_320x128_64x3", 200),
        kernel("cudnn_generated_fort_native_sdpa_sm90_flash_bprop_wgmma_f16_knob_26", 300),
        kernel("loop_add_fusion_12", 90), kernel("memcpy32_post", 10),
        kernel("fusion.1", 5000, tid=11), kernel("PjitFunction(step)", 9000, tid=5, pid=2),
    ])
    summary = benchmark.summarize_trace(str(tmp_path), steps=2, top=2)
    assert summary["device_ms_per_step"] == 0.5  # (400 + 200 + 300 + 90 + 10) us / 2 steps
    assert summary["categories_ms"] == {"matmul": 0.3, "attention": 0.15, "other": 0.045, "copy": 0.005}
    assert summary["top_kernels"] == [
        dict(name="nvjet_sm90_tst_320x128_64x3_1x2_h_bz_coopB_NTT", ms=0.2, share=0.4),
        dict(name="cudnn_generated_fort_native_sdpa_sm90_flash_bprop_wgmma_f16_knob_26", ms=0.15, share=0.3)]


def test_summarize_trace_without_streams_reads_xla_ops(tmp_path):
    """A TPU-like trace (no Stream threads) is read off "XLA Ops"; a host-only trace (CPU) gives {}."""
    _write_trace(tmp_path / "tpu", [
        _meta("process_name", 3, "/device:TPU:0"), _meta("thread_name", 3, "XLA Ops", 1),
        _meta("thread_name", 3, "XLA Modules", 2),
        dict(ph="X", pid=3, tid=1, ts=0, dur=300, name="convolution.7"),
        dict(ph="X", pid=3, tid=1, ts=0, dur=100, name="fusion.3"),
        dict(ph="X", pid=3, tid=2, ts=0, dur=400, name="jit_step"),
    ])
    assert benchmark.summarize_trace(str(tmp_path / "tpu"), steps=1)["categories_ms"] == {"matmul": 0.3, "other": 0.1}
    _write_trace(tmp_path / "cpu", [_meta("process_name", 701, "/host:CPU"),
                                    dict(ph="X", pid=701, tid=1, ts=0, dur=50, name="ynn_fusion")])
    assert benchmark.summarize_trace(str(tmp_path / "cpu"), steps=1) == {}
    assert benchmark.summarize_trace(str(tmp_path / "nothing"), steps=1) == {}
