"""The shared absl glue: tools run in-process on their own FlagValues and as programs with usage errors."""

import os
import subprocess
import sys

import pytest
from absl import flags

from qk_jax import cli

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _define(fv):
    flags.DEFINE_integer("steps", 3, "how many", flag_values=fv)


def _run(fv):
    return [fv.steps] * 2


def test_in_process_parses_its_own_flags_and_leaves_the_global_ones_alone():
    before = {name: getattr(flags.FLAGS[name], "value", None) for name in flags.FLAGS}  # other tools define some
    assert cli.in_process("tool", _define, _run, ["--steps", "5"]) == [5, 5]
    assert cli.in_process("tool", _define, _run, []) == [3, 3]  # a fresh FlagValues each call
    assert {name: getattr(flags.FLAGS[name], "value", None) for name in flags.FLAGS} == before
    with pytest.raises(flags.Error):
        cli.in_process("tool", _define, _run, ["--stpes", "5"])


def test_a_program_refuses_positional_arguments():
    """``python -m qk_jax.plan`` (``cli.run_as_program``): a stray argument is a usage error, not ignored."""
    out = subprocess.run([sys.executable, "-m", "qk_jax.plan", "--config", "configs/stage2.py:tiny", "stray"],
                         capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert out.returncode == 1 and "unexpected arguments ['stray']" in out.stderr, out.stderr[-2000:]


def test_importing_a_tool_defines_no_global_flag():
    """Tools declare their flags on the FlagValues they are given, so one imports another (or a test imports
    several) without flag clashes."""
    code = ("from absl import app, flags, logging\n"
            "import qk_jax.data.pipeline, qk_jax.training.checkpoint  # grain's and orbax's own flags\n"
            "before = set(flags.FLAGS)\n"
            "import qk_jax.bench, qk_jax.evaluate, qk_jax.plan, qk_jax.sample\n"
            "print(sorted(set(flags.FLAGS) - before))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert out.returncode == 0 and out.stdout.strip() == "[]", (out.stdout, out.stderr[-2000:])
