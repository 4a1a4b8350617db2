r"""Benchmark the MMDiT training step, a guided sampling step or the VLM forward, JAX beside PyTorch (diffusers).

USAGE: python -m qk_jax.bench --config STAGE.py[:variant] [--what mmdit_train ...] [--batch N] [--torch]

  python -m qk_jax.bench --config configs/stage2.py:bench --what mmdit_train --batch 8 --image-tokens 1024 --torch

prints one JSON line per measurement. What is measured and what each field means: ``qk_jax.perf.benchmark``.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from absl import app, flags
from ml_collections import config_flags

from qk_jax import cli
from qk_jax.perf import benchmark


def define_flags(fv: flags.FlagValues) -> None:
    """The tool's flags, declared on ``fv`` (``qk_jax.cli``): importing this module defines no global flag."""
    kw = dict(flag_values=fv)
    config_flags.DEFINE_config_file("config", None, "A stage config: configs/stage2.py:bench (or :tiny).",
                                    lock_config=False, **kw)
    flags.DEFINE_multi_enum("what", ["mmdit_train"], benchmark.WHAT, "What to measure (repeat the flag for several).",
                            **kw)
    flags.DEFINE_integer("batch", 1, "Samples per step.", lower_bound=1, **kw)
    flags.DEFINE_integer("image-tokens", 1024, "Noisy-target image tokens per sample.", lower_bound=1, **kw)
    flags.DEFINE_integer("text-tokens", 256, "Text-stream tokens per sample (MMDiT: text + kontext; VLM: the"
                         " prompt, before the kontext queries).", lower_bound=1, **kw)
    flags.DEFINE_integer("steps", 20, "Timed steps (the median is reported).", lower_bound=1, **kw)
    flags.DEFINE_integer("warmup", 3, "Untimed steps first (the first compiles).", lower_bound=1, **kw)
    flags.DEFINE_bool("torch", False, "Also run diffusers' FluxTransformer2DModel on the same batch.", **kw)
    flags.DEFINE_bool("torch-compile", True, "torch.compile the diffusers model (--torch).", **kw)
    flags.DEFINE_float("peak-tflops", None, "The device's dense peak TFLOP/s for MFU (default: PEAK_TFLOPS).", **kw)
    flags.DEFINE_string("remat", None, "Override config.remat (mmdit.REMAT_POLICIES).", **kw)
    flags.DEFINE_bool("scan-layers", None, "Override config.scan_layers.", **kw)
    flags.DEFINE_string("profile", None, "Also profile 3 JAX steps into this folder (one per --what) and add the "
                        "device time per step by kernel category and the top kernels to the JSON line.", **kw)


def run_flags(fv: flags.FlagValues) -> list[dict[str, Any]]:
    """The measurements the parsed flags ask for, each printed as one JSON line as it is made; returns them."""
    config = fv.config
    if config is None:
        raise app.UsageError("no --config; give a stage config, e.g. --config configs/stage2.py:bench")
    if fv.remat is not None:
        config.remat = fv.remat
    if fv["scan-layers"].value is not None:
        config.scan_layers = fv["scan-layers"].value
    if "sample" in fv.what:
        try:
            benchmark.guidance_scales(config)  # before any measurement: a missing block fails at once
        except ValueError as e:
            raise app.UsageError(str(e)) from None
    shape = benchmark.Shape(fv.batch, fv["image-tokens"].value, fv["text-tokens"].value)
    results = []
    for what in fv.what:
        for result in benchmark.run(config, what, shape, warmup=fv.warmup, steps=fv.steps, with_torch=fv.torch,
                                    torch_compile=fv["torch-compile"].value, peak=fv["peak-tflops"].value,
                                    profile_dir=fv.profile):
            print(json.dumps(result), flush=True)
            results.append(result)
    return results


def main(argv: Sequence[str]) -> list[dict[str, Any]]:
    """``python -m qk_jax.bench`` in-process: ``main(['--config', 'configs/stage2.py:tiny', '--steps', '2'])``."""
    return cli.in_process("qk_jax.bench", define_flags, run_flags, argv)


if __name__ == "__main__":
    cli.run_as_program(define_flags, run_flags)
