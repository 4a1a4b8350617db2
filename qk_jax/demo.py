r"""A web demo of a checkpoint: every sampling task in the browser (gradio; ``pip install -e '.[demo]'``).

USAGE: python -m qk_jax.demo --checkpoint DIR [--host 127.0.0.1 --port 7860 --share]

  python -m qk_jax.demo --checkpoint runs/shapes/stage3/final

serves http://127.0.0.1:7860 until interrupted. What the page holds: ``qk_jax.sampling.web_demo``.
"""

from __future__ import annotations

from collections.abc import Sequence

from absl import app, flags

from qk_jax import cli

INSTALL_HINT = "pip install 'qk_jax[demo]' (in a checkout: pip install -e '.[demo]')"


def define_flags(flag_values: flags.FlagValues) -> None:
    """The CLI's flags, on ``flag_values`` (not at import: other entry points may use the same names)."""
    fv = dict(flag_values=flag_values)
    flags.DEFINE_string("checkpoint", None, "A model directory (a stage's final/).", **fv)
    flags.DEFINE_string("host", "127.0.0.1", "The address to serve on (0.0.0.0: every interface).", **fv)
    flags.DEFINE_integer("port", 7860, "The port to serve on.", lower_bound=1, upper_bound=65535, **fv)
    flags.DEFINE_bool("share", False, "Also open a public gradio.live link (needs the internet).", **fv)
    flags.DEFINE_string("tokenizer", None, "A local Qwen2.5-VL tokenizer folder (default: the stand-in "
                        "that config.vlm.tokenizer names: word-level for ShapesWorld, byte-level for tiny).", **fv)
    flags.mark_flags_as_required(["checkpoint"], **fv)


def run_flags(fv: flags.FlagValues) -> None:
    """Loads the checkpoint and serves the demo until interrupted. User errors raise ``app.UsageError``: gradio
    missing, a bad checkpoint, a port in use."""
    try:
        import gradio  # noqa: F401  (checked first: loading a checkpoint takes a while)
    except ImportError as e:
        raise app.UsageError(f"the web demo needs gradio ({e}): {INSTALL_HINT}") from e
    from qk_jax.sampling import web_demo
    from qk_jax.sampling.kontext_pipeline import QueryKontextPipeline

    checkpoint = fv["checkpoint"].value
    try:
        pipe = QueryKontextPipeline.from_pretrained(checkpoint, tokenizer=fv["tokenizer"].value)
    except (ValueError, FileNotFoundError) as e:  # CheckpointMismatchError is a ValueError
        raise app.UsageError(str(e)) from e
    demo = web_demo.build_demo(pipe, checkpoint=checkpoint)
    try:
        web_demo.serve(demo, host=fv["host"].value, port=fv["port"].value, share=fv["share"].value)
    except OSError as e:  # gradio's "Cannot find empty port"
        raise app.UsageError(f"--host {fv['host'].value} --port {fv['port'].value}: {e}") from e


def main(argv: Sequence[str]) -> None:
    """``python -m qk_jax.demo`` in-process: ``main(['--checkpoint', DIR])`` serves until interrupted.

    ``argv`` are the flags without the program name; bad flags raise ``flags.Error``, user errors
    ``app.UsageError``.
    """
    return cli.in_process("qk_jax.demo", define_flags, run_flags, argv)


if __name__ == "__main__":
    cli.run_as_program(define_flags, run_flags)
