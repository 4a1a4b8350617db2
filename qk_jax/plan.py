r"""Plan a stage on a mesh: parameters, memory and FLOPs per device, before anything is allocated.

USAGE: python -m qk_jax.plan (--config STAGE.py[:variant] | --all) --devices N --device-memory 80GB [--mesh D,F,T]

  python -m qk_jax.plan --config configs/stage2.py --devices 192 --device-memory 80GB --mesh 48,1,4

How the numbers are made: ``qk_jax.parallel.planner``.
"""

from __future__ import annotations

from collections.abc import Sequence

from absl import app, flags
from ml_collections import config_flags

from qk_jax import cli
from qk_jax.parallel import planner


def _config_name(flag_text: str) -> str:
    """``--config=configs/stage3b.py:shapes`` -> ``stage3b:shapes``."""
    value = flag_text.split("=", 1)[-1]
    path, _, arg = value.partition(":")
    name = path.rsplit("/", 1)[-1].removesuffix(".py")
    return f"{name}:{arg}" if arg else name


def define_flags(flag_values: flags.FlagValues) -> None:
    """The CLI's flags, on ``flag_values`` (not at import: ``qk_jax.train`` also defines ``--config``)."""
    fv = dict(flag_values=flag_values)
    config_flags.DEFINE_config_file("config", None, "A stage config (configs/stageN.py[:variant]); omit for every"
                                    " paper stage.", lock_config=False, **fv)
    flags.DEFINE_bool("all", False, "Plan every stage config (stage1, 2, 3, 3b at paper scale).", **fv)
    flags.DEFINE_integer("devices", 192, "Number of devices.", **fv)
    flags.DEFINE_string("device-memory", "80GB", "Memory per device, e.g. 80GB, 80GiB or a byte count.", **fv)
    flags.DEFINE_string("mesh", None, "data,fsdp,tensor sizes, e.g. 48,1,4 (default: search).", **fv)
    flags.DEFINE_float("mfu", 0.4, "Model FLOPs utilisation for the time per step.", **fv)
    flags.DEFINE_float("peak-tflops", 989.0, "Peak dense TFLOP/s per device (989: H100 SXM bf16).", **fv)
    flags.DEFINE_enum("remat", None, ["none", "full"], "MMDiT block remat assumed for the activations (default:"
                      " the config's remat, any policy but none planned as full).", **fv)
    flags.DEFINE_enum("attention", "flash", ["flash", "xla"], "flash (cuDNN on GPU: no scores kept) or xla"
                      " (scores kept: CPU/TPU XLA).", **fv)
    flags.DEFINE_enum("zero", "repo", ["repo", "even"], "ZeRO shards as parallel.mesh.zero_sharding does (repo: a"
                      " leaf with no dim divisible by data x fsdp stays whole) or every leaf evenly (even).", **fv)
    flags.DEFINE_bool("json", False, "Print one JSON line per stage instead of the table.", **fv)


def run_flags(fv: flags.FlagValues) -> list[str]:
    """Plans for the parsed flags; prints and returns the output lines (a table or JSON lines)."""
    if fv.config is not None and not fv.all:
        configs = [(_config_name(fv["config"].serialize()), fv.config)]
    else:
        configs = planner.paper_configs()
    try:
        memory = planner.parse_memory(fv["device-memory"].value)
        mesh = planner.parse_mesh(fv.mesh) if fv.mesh else None
        results = planner.run(configs, fv.devices, memory, mesh, remat=fv.remat, attention=fv.attention,
                              zero=fv.zero, mfu=fv.mfu, peak_tflops=fv["peak-tflops"].value)
    except ValueError as e:
        raise app.UsageError(str(e)) from None
    fmt = planner.format_json if fv.json else planner.format_plan
    out = [fmt(plan, smallest) for plan, smallest in results]
    print("\n".join(out))
    return out


def main(argv: Sequence[str]) -> list[str]:
    """``python -m qk_jax.plan`` in-process: ``main(['--config', 'configs/stage2.py', '--devices', '192'])``."""
    return cli.in_process("qk_jax.plan", define_flags, run_flags, argv)


if __name__ == "__main__":
    cli.run_as_program(define_flags, run_flags)
