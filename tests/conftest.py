"""Shared test set-up: float32 numerics at full matmul precision, on the CPU; one persistent compilation cache
per test session (a temporary folder), so that tests compiling the same program, in this process or in the
multi-device subprocesses, which inherit it, compile it once."""

import atexit
import os
import re
import shutil
import tempfile

os.environ.setdefault("JAX_PLATFORMS", "cpu")
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="qk_jax_test_xla_cache_")
    atexit.register(shutil.rmtree, os.environ["JAX_COMPILATION_CACHE_DIR"], True)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")
# XLA:CPU's backend (LLVM) optimisation off: the tests' programs are tiny and compiled once each, so compiling fast
# beats running fast (a FLUX-layout test: 93 s -> 65 s). HLO-level passes, and so every value the tests compare,
# are unchanged; a run with XLA_FLAGS already set keeps its own. Set in pytest_configure, before any backend starts.
TEST_XLA_FLAGS = "--xla_backend_optimization_level=0"


def selects_slow(markexpr: str) -> bool:
    """Whether ``-m markexpr`` asks for the slow tests (``slow``, ``slow and not demo``; not ``not slow``)."""
    return bool(re.search(r"(?<!not )\bslow\b", markexpr))


def pytest_configure(config):
    # The slow tests train for up to an hour, where running fast beats compiling fast (optimisation level 0 ran
    # ShapesWorld training steps at about half speed): they keep XLA's default.
    if not selects_slow(config.option.markexpr or ""):
        os.environ.setdefault("XLA_FLAGS", TEST_XLA_FLAGS)


def fake_devices_env(devices: int = 8, **extra: str) -> dict[str, str]:
    """The environment of a test subprocess on ``devices`` fake CPU devices, with the suite's XLA flags."""
    flags = f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={devices}".strip()
    return dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=flags, **extra)

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


# The files that take minutes, longest first: run first, each xdist worker starts on one of them and the short
# files fill in around them, instead of one long file starting last and running alone at the end.
LONG_FILES = ("test_multiprocess.py", "test_curriculum.py", "test_storage.py", "test_zero.py", "test_stage0.py")


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(LONG_FILES)}
    items.sort(key=lambda item: rank.get(item.path.name, len(LONG_FILES)))  # stable: the rest keep their order


def host_bytes_held(pattern: str) -> int:
    """Bytes of live Python/NumPy allocations made by lines of files matching ``pattern`` (``tracemalloc``, which
    must be tracing): what a loader holds on the host at this moment."""
    import tracemalloc

    snapshot = tracemalloc.take_snapshot().filter_traces([tracemalloc.Filter(True, pattern)])
    return sum(stat.size for stat in snapshot.statistics("filename"))


@pytest.fixture(scope="session")
def random_stage3_checkpoint(tmp_path_factory):
    """A tiny stage-3 model folder (``saved_model.save_model``) of random, untrained params: for tests of what
    reads a checkpoint (sampling, diagnostics), not of what it learned. Read it in place."""
    from configs import stage3
    from qk_jax.models import saved_model
    from qk_jax.models.query_kontext import QueryKontext, QueryKontextConfig

    config = stage3.get_config("tiny")
    params = QueryKontext(QueryKontextConfig.from_config(config)).init(jax.random.key(0))
    path = tmp_path_factory.mktemp("random_stage3") / "model"
    saved_model.save_model(path, config, params, meta={"stage": 3, "step": 0})
    return path
