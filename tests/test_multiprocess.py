"""The pod path without a pod: two CPU processes joined by ``jax.distributed`` (``launch/local_processes.sh``, 4
fake devices each) train the tiny stage 1 and then stage 2 from it, as one process with 8 devices does: the same
global batches (``data.global_stream``), the same per-step losses and final params within 1e-5."""

import os
import subprocess
import sys

import numpy as np
import pytest

from qk_jax.models import saved_model
from qk_jax.parallel import distributed
from qk_jax.pytree import flatten
from qk_jax.training import metrics

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FLAGS = ["--config.batch_size=8", "--config.total_steps=3", "--config.data.global_stream=True"]


def _train(processes: int, devices: int, workdir: str, config: str, *extra: str) -> None:
    args = ["--config", config, "--workdir", workdir, *FLAGS, *extra]
    if processes == 1:
        env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
        out = subprocess.run([sys.executable, "-m", "qk_jax.train", *args], cwd=ROOT, env=env, capture_output=True,
                             text=True, timeout=900)
        assert out.returncode == 0, out.stderr[-4000:]
        return
    out = subprocess.run(["bash", "launch/local_processes.sh", str(processes), str(devices), *args], cwd=ROOT,
                         capture_output=True, text=True, timeout=900)
    logs = [f"{workdir}.process{i}.log" for i in range(processes)]
    assert out.returncode == 0, out.stderr[-2000:] + "".join(open(p).read()[-3000:] for p in logs if os.path.exists(p))


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("multiprocess")
    for name, (processes, devices) in dict(one=(1, 8), two=(2, 4)).items():
        _train(processes, devices, str(root / name / "stage1"), "configs/stage1.py:tiny")
        _train(processes, devices, str(root / name / "stage2"), "configs/stage2.py:tiny",
               f"--config.init_from={root / name / 'stage1'}")
    return root


@pytest.mark.parametrize("stage", ["stage1", "stage2"])
def test_two_processes_train_as_one(runs, stage):
    one, two = (metrics.read_jsonl(str(runs / name / stage / metrics.JSONL)) for name in ("one", "two"))
    assert sorted(one) == sorted(two) == [1, 2, 3]
    for step in one:
        for key in ("loss", "grad_norm"):
            np.testing.assert_allclose(two[step][key], one[step][key], rtol=1e-5, err_msg=f"{stage} step {step} {key}")
    _, params_one, meta = saved_model.load_model(runs / "one" / stage / "final")
    _, params_two, _ = saved_model.load_model(runs / "two" / stage / "final")
    flat_one, flat_two = flatten(params_one), flatten(params_two)
    assert flat_one.keys() == flat_two.keys() and meta["step"] == 3
    for path, value in flat_one.items():
        np.testing.assert_allclose(flat_two[path], value, rtol=1e-5, atol=1e-6, err_msg=path)


def test_each_process_joined_with_its_share_of_the_devices(runs):
    log = open(f"{runs / 'two' / 'stage1'}.process1.log").read()
    assert "process 1 of 2, 4 of 8 devices here" in log


def test_cluster_detection_reads_the_environment():
    env = dict(JAX_COORDINATOR_ADDRESS="127.0.0.1:1", JAX_NUM_PROCESSES="2", JAX_PROCESS_ID="1")
    assert distributed.cluster_detected(env) and distributed.cluster_detected({"SLURM_NTASKS": "4"})
    assert distributed.cluster_detected({"TPU_WORKER_HOSTNAMES": "a,b"}) and distributed.cluster_detected(
        {"QK_JAX_DISTRIBUTED": "1"})
    assert not distributed.cluster_detected({"SLURM_NTASKS": "1", "TPU_WORKER_HOSTNAMES": "a"})
