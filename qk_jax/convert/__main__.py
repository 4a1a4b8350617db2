r"""python -m qk_jax.convert {import,export}: whole-model checkpoint conversion (``qk_jax.convert.export``).

Import transformers/diffusers folders into a stage's initial model checkpoint (components not given are random)::

    python -m qk_jax.convert import --qwen Qwen2.5-VL-7B-Instruct --mmdit FLUX.1-dev/transformer \
        --vae FLUX.1-dev/vae --config configs/stage1.py --out /tmp/qk_init --dtype bfloat16

Export a model checkpoint (a stage's ``<workdir>/final``) as transformers/diffusers folders plus the kontext
queries, the connector and a README::

    python -m qk_jax.convert export --checkpoint /tmp/qk_stage3/final --out /tmp/qk_export
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
from collections.abc import Sequence
from pathlib import Path

import jax.numpy as jnp

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


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m qk_jax.convert", description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    imp = commands.add_parser("import", help="transformers/diffusers folders -> a stage's initial model checkpoint")
    imp.add_argument("--qwen", required=True, help="Qwen2_5_VLForConditionalGeneration folder (save_pretrained)")
    imp.add_argument("--mmdit", help="diffusers FluxTransformer2DModel folder; default: random")
    imp.add_argument("--vae", help="diffusers AutoencoderKL folder; default: random")
    imp.add_argument("--config", required=True, help="stage config: configs/stageN.py[:variant]")
    imp.add_argument("--out", required=True, help="new directory for the model checkpoint")
    imp.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"), help="dtype of the stored params")
    imp.add_argument("--seed", type=int, default=0, help="seed of the randomly initialised parts")
    exp = commands.add_parser("export", help="a model checkpoint -> transformers/diffusers folders + kontext weights")
    exp.add_argument("--checkpoint", required=True, help="a save_model directory (a stage's <workdir>/final)")
    exp.add_argument("--out", required=True, help="new directory for the exported folders")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command; ``argv`` without the program name. User errors raise (ValueError/CheckpointError)."""
    args = _parser().parse_args(argv)
    if args.command == "import":
        export_lib.import_model(load_config(args.config), args.out, qwen=args.qwen, mmdit=args.mmdit, vae=args.vae,
                                dtype=jnp.dtype(args.dtype), seed=args.seed)
    else:
        export_lib.export_model(args.checkpoint, args.out)
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except (ValueError, FileNotFoundError, FileExistsError) as e:  # CheckpointError is a ValueError
        sys.exit(f"error: {e}")
