"""The shared absl glue: tools run in-process on their own FlagValues and as programs with usage errors."""

import os
import subprocess
import sys

import pytest
from absl import app, flags

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
    assert out.returncode == 2 and "unexpected arguments ['stray']" in out.stderr, out.stderr[-2000:]
    assert len(out.stderr.strip().splitlines()) == 1 and out.stderr.startswith("error: "), out.stderr[-2000:]


def test_a_usage_error_is_one_line_without_docstring_or_traceback():
    out = subprocess.run([sys.executable, "-m", "qk_jax.sample", "--checkpoint", "/nowhere", "--prompt", "a",
                          "--out", "x.jpg"], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert out.returncode == 2, out.stderr[-2000:]
    assert out.stderr.strip().splitlines() == ["error: --out x.jpg: give a .png path (the grid; the images go "
                                               "beside it)"], out.stderr[-2000:]


def test_help_is_short_and_lists_the_flags_early():
    for program in ("qk_jax.train", "qk_jax.sample", "qk_jax.evaluate", "qk_jax.convert"):
        out = subprocess.run([sys.executable, "-m", program, "--help"], capture_output=True, text=True, cwd=ROOT,
                             timeout=300)
        lines = out.stdout.splitlines()
        assert lines and lines[0] and "USAGE: python -m " + program in out.stdout, (program, out.stdout[:3000])
        assert lines.index("flags:") < 20, (program, out.stdout[:3000])


def test_actions_are_the_one_positional_argument():
    def run(fv, action):
        return action, fv.steps

    assert cli.in_process("tool", _define, run, ["go", "--steps", "4"], actions=("go", "stop")) == ("go", 4)
    assert cli.in_process("tool", _define, run, ["--steps", "4", "stop"], actions=("go", "stop")) == ("stop", 4)
    for argv in ([], ["go", "stop"], ["jump"]):
        with pytest.raises(app.UsageError, match="give one action, go or stop"):
            cli.in_process("tool", _define, run, argv, actions=("go", "stop"))
    with pytest.raises(app.UsageError, match="unexpected arguments"):
        cli.in_process("tool", _define, _run, ["go"])


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


def test_without_verbose_other_libraries_keep_only_their_warnings():
    # Orbax logs through absl as qk_jax does: the record's file decides. Ours (qk_jax/, configs/) pass at INFO.
    import logging

    def record(path, level):
        return logging.LogRecord("absl", level, path, 1, "a line", None, None)

    orbax = os.path.join(os.path.dirname(os.__file__), "site-packages", "orbax", "checkpoint", "x.py")
    own, config = os.path.abspath(cli.__file__), os.path.join(os.path.dirname(os.path.dirname(
        os.path.abspath(cli.__file__))), "configs", "common.py")
    keep = cli.OwnInfoOnly().filter
    assert keep(record(own, logging.INFO)) and keep(record(config, logging.INFO))
    assert not keep(record(orbax, logging.INFO)) and keep(record(orbax, logging.WARNING))


def test_verbose_is_a_flag_of_every_program():
    out = subprocess.run([sys.executable, "-m", "qk_jax.plan", "--helpfull"], capture_output=True, text=True,
                         cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))), timeout=120)
    assert "--[no]verbose" in out.stdout + out.stderr
