r"""Convert whole models: transformers/diffusers folders in (``import``), PyTorch-loadable folders out (``export``).

USAGE: python -m qk_jax.convert import --qwen DIR --config configs/stageN.py[:variant] --out DIR [--mmdit DIR]
       python -m qk_jax.convert export --checkpoint DIR --out DIR

Import transformers/diffusers folders into a stage's initial model checkpoint (components not given are random):

    python -m qk_jax.convert import --qwen Qwen2.5-VL-7B-Instruct --mmdit FLUX.1-dev/transformer \
        --vae FLUX.1-dev/vae --config configs/stage1.py --out /tmp/qk_init --dtype bfloat16

Export a model checkpoint (a stage's ``<workdir>/final``) as transformers/diffusers folders plus the kontext
queries, the connector and a README (``qk_jax.convert.export``):

    python -m qk_jax.convert export --checkpoint /tmp/qk_stage3/final --out /tmp/qk_export
"""

from __future__ import annotations

import importlib.util
import sys
from collections.abc import Sequence
from pathlib import Path

import jax.numpy as jnp
from absl import app, flags

from qk_jax import cli
from qk_jax.convert import export as export_lib


def load_config(spec: str):
    """``configs/stageN.py[:arg]`` -> the module's ``get_config(arg)`` (ml_collections' ``--config`` syntax)."""
    path, _, arg = spec.partition(":")
    if not Path(path).is_file():
        raise ValueError(f"--config {spec!r}: no file {path!r}; pass configs/stage1.py[:variant]")
    root = str(Path(path).resolve().parent.parent)  # the repository root, so that `from configs import ...` works
    if root not in sys.path:
        sys.path.insert(0, root)
    module_spec = importlib.util.spec_from_file_location(f"_qk_convert_config_{Path(path).stem}", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module.get_config(arg or None)


ACTIONS = ("import", "export")
# The flags each action needs (the others are refused for it).
_NEEDS = dict(import_=("qwen", "config", "out"), export=("checkpoint", "out"))
_TAKES = dict(import_=("qwen", "mmdit", "vae", "config", "out", "dtype", "seed"), export=("checkpoint", "out"))


def define_flags(fv: flags.FlagValues) -> None:
    kw = dict(flag_values=fv)
    flags.DEFINE_string("qwen", None, "import: a Qwen2_5_VLForConditionalGeneration folder (save_pretrained).", **kw)
    flags.DEFINE_string("mmdit", None, "import: a diffusers FluxTransformer2DModel folder (default: random).", **kw)
    flags.DEFINE_string("vae", None, "import: a diffusers AutoencoderKL folder (default: random).", **kw)
    flags.DEFINE_string("config", None, "import: the stage config, configs/stageN.py[:variant].", **kw)
    flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "import: dtype of the stored params.", **kw)
    flags.DEFINE_integer("seed", 0, "import: seed of the randomly initialised parts.", **kw)
    flags.DEFINE_string("checkpoint", None, "export: a model directory (a stage's <workdir>/final).", **kw)
    flags.DEFINE_string("out", None, "A new directory: the model checkpoint (import) or the exported folders.", **kw)


def run_flags(fv: flags.FlagValues, action: str) -> int:
    """Run one action. User errors in the flags are ``app.UsageError``; in the files, ``ValueError`` (a
    ``CheckpointError``) or ``FileNotFoundError``/``FileExistsError`` naming the file."""
    key = "import_" if action == "import" else action
    missing = [f"--{name}" for name in _NEEDS[key] if fv[name].value is None]
    if missing:
        raise app.UsageError(f"convert {action} needs {' '.join(missing)}")
    stray = [f"--{name}" for name in ("qwen", "mmdit", "vae", "config", "checkpoint")
             if name not in _TAKES[key] and fv[name].value is not None]
    if stray:
        raise app.UsageError(f"convert {action} does not take {' '.join(stray)}")
    if action == "import":
        export_lib.import_model(load_config(fv.config), fv.out, qwen=fv.qwen, mmdit=fv.mmdit, vae=fv.vae,
                                dtype=jnp.dtype(fv.dtype), seed=fv.seed)
    else:
        export_lib.export_model(fv.checkpoint, fv.out)
    return 0


def _run_reporting_file_errors(fv: flags.FlagValues, action: str) -> int:
    """As a program: a bad folder or file (``ValueError``, ``FileNotFoundError``, ``FileExistsError``) is a
    one-line usage error too."""
    try:
        return run_flags(fv, action)
    except (ValueError, FileNotFoundError, FileExistsError) as e:  # CheckpointError is a ValueError
        raise app.UsageError(str(e)) from None


def main(argv: Sequence[str]) -> int:
    """``python -m qk_jax.convert`` in-process: ``main(["export", "--checkpoint", DIR, "--out", OUT])``. User
    errors in the files raise (``ValueError``/``CheckpointError``, ``FileNotFoundError``), in the flags
    ``app.UsageError``."""
    return cli.in_process("qk_jax.convert", define_flags, run_flags, argv, actions=ACTIONS)


if __name__ == "__main__":
    cli.run_as_program(define_flags, _run_reporting_file_errors, actions=ACTIONS)
