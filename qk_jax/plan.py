r"""Plan a stage on a mesh: parameters, memory and FLOPs per device, before anything is allocated.

USAGE: python -m qk_jax.plan (--config STAGE.py[:variant] | --all) --devices N --device-memory 80GB [--mesh D,F,T]
                            [--compile [--topology v5p:4x4x8]]

  python -m qk_jax.plan --config configs/stage2.py --devices 192 --device-memory 80GB --mesh 64,3,1
  python -m qk_jax.plan --config configs/stage2.py --devices 128 --compile --topology v5p:4x4x8   # AOT, no TPU

How the numbers are made: ``qk_jax.parallel.planner``.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence

from absl import app, flags
from ml_collections import config_flags

from qk_jax import cli
from qk_jax.parallel import mesh as mesh_lib
from qk_jax.parallel import planner
from qk_jax.training import loop


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
    flags.DEFINE_bool("compile", False, "Also lower and compile the real sharded training step for the mesh (the"
                      " config's, or --mesh) on --topology and print the compiler's memory analysis beside the"
                      " plan. Nothing is allocated.", **fv)
    flags.DEFINE_string("topology", "local", "With --compile: 'local' (this host's devices) or a TPU topology,"
                        " e.g. v5p:4x4x8 (needs pip install libtpu; no TPU).", **fv)


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
    if fv.compile:
        out.append(_compiled(fv, configs))
    print("\n".join(out))
    return out


def _compiled(fv: flags.FlagValues, configs) -> str:
    """``--compile``: the step of the one ``--config`` compiled on ``--topology`` (``loop.compile_step``)."""
    if len(configs) != 1 or fv.all:
        raise app.UsageError("--compile takes one --config")
    (name, config), = configs
    try:
        devices = mesh_lib.topology_devices(fv.topology)
        if fv.mesh:
            config.mesh = tuple(zip(mesh_lib.MESH_AXES, planner.parse_mesh(fv.mesh)))
        mesh = mesh_lib.make_mesh(config.mesh, devices)
    except ValueError as e:
        raise app.UsageError(str(e)) from None
    shape = tuple(int(mesh.shape[a]) for a in mesh_lib.MESH_AXES)
    plan = planner.Planner(config, name).plan(shape, planner.parse_memory(fv["device-memory"].value),
                                              micro=int(config.batch_size) // mesh_lib.data_axes_size(mesh),
                                              attention=fv.attention,
                                              remat=fv.remat or ("none" if config.get("remat", "none") == "none"
                                                                 else "full"))
    start = time.perf_counter()
    stats = loop.compile_step(config, mesh).memory_analysis()
    where = f"{len(devices)} devices ({fv.topology}), mesh {dict(mesh.shape)}"
    if fv.json:
        return json.dumps(dict(stage=name, compiled_bytes=planner.compiled_bytes(stats), planned_bytes=plan.total,
                               temp_bytes=stats.temp_size_in_bytes, devices=len(devices), topology=fv.topology))
    return planner.format_compiled(stats, plan, where, time.perf_counter() - start)


def main(argv: Sequence[str]) -> list[str]:
    """``python -m qk_jax.plan`` in-process: ``main(['--config', 'configs/stage2.py', '--devices', '192'])``."""
    return cli.in_process("qk_jax.plan", define_flags, run_flags, argv)


if __name__ == "__main__":
    cli.run_as_program(define_flags, run_flags)
