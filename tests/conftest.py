"""Shared test set-up: float32 numerics at full matmul precision, on the CPU; one persistent compilation cache
per test session (a temporary folder), so that tests compiling the same program, in this process or in the
multi-device subprocesses, which inherit it, compile it once."""

import atexit
import os
import shutil
import tempfile

os.environ.setdefault("JAX_PLATFORMS", "cpu")
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="qk_jax_test_xla_cache_")
    atexit.register(shutil.rmtree, os.environ["JAX_COMPILATION_CACHE_DIR"], True)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def tiny_stage0(tmp_path_factory):
    """Stage 0 of the tiny ShapesWorld curriculum (``qk_jax.training.stage0``), trained once per test session:
    ``(directory, stage0.Result)``. Read it in place; copy the directory before running anything that writes
    there (``Result`` keeps paths relative to it)."""
    from configs import shapes as shapes_config
    from qk_jax.training import stage0

    directory = str(tmp_path_factory.mktemp("tiny_stage0") / stage0.DIRNAME)
    return directory, stage0.run(shapes_config.get_config("tiny"), directory)
