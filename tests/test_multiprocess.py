"""The pod path without a pod: two CPU processes joined by ``jax.distributed`` (``launch/local_processes.sh``, 4
fake devices each) train the tiny curriculum, stage 1 -> 2 -> 3, into a bucket (``gcs_emulator``'s in-memory
``gs://bucket``, each stage read from the one before it there), as one process with 8 devices does in a local
folder: the same global batches (``data.global_stream``), the same per-step losses and final params within 1e-5.
On the way the two-process run is stopped twice, as a pod is: SIGTERM to one process in stage 1 (both save the
same step and exit 0) and ``kill -9`` of both in stage 2 after a committed checkpoint; each rerun resumes, and the
curve still equals the uninterrupted one-process run's."""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

import gcs_emulator
from qk_jax import storage
from qk_jax.models import saved_model
from qk_jax.parallel import distributed
from qk_jax.pytree import flatten
from qk_jax.training import metrics
from conftest import fake_devices_env

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FLAGS = ["--config.batch_size=8", "--config.data.global_stream=True"]
STAGES = dict(stage1=6, stage2=6, stage3=3)  # steps: enough after a stop (tiny saves every 2) to resume into
TIMEOUT = 900


def _command(processes: int, devices: int, workdir: str, stage: str, root: str) -> tuple[list[str], dict]:
    args = ["--config", f"configs/{stage}.py:tiny", "--workdir", workdir, *FLAGS,
            f"--config.total_steps={STAGES[stage]}"]
    if stage != "stage1":
        args.append(f"--config.init_from={storage.join(root, f'stage{int(stage[-1]) - 1}')}")
    if processes == 1:
        env = fake_devices_env(devices)
        return [sys.executable, "-m", "qk_jax.train", *args], env
    return ["bash", "launch/local_processes.sh", str(processes), str(devices), *args], dict(os.environ)


def _log_path(workdir: str, process: int) -> str:
    """Where ``launch/local_processes.sh`` puts a process's log: beside a local workdir, in ``$LOG_DIR`` for a
    bucket's."""
    if storage.is_remote(workdir):
        return os.path.join(os.environ["LOG_DIR"], f"{os.path.basename(workdir)}.process{process}.log")
    return f"{workdir}.process{process}.log"


def _logs(workdir: str, processes: int) -> list[str]:
    paths = [_log_path(workdir, i) for i in range(processes)]
    return [open(p).read() if os.path.exists(p) else "" for p in paths]


def _finish(launched: subprocess.Popen, workdir: str, processes: int) -> None:
    _, err = launched.communicate(timeout=TIMEOUT)
    assert launched.returncode == 0, (err or "")[-3000:] + "".join(log[-3000:] for log in _logs(workdir, processes))


def _wait_until(ready, launched: subprocess.Popen, what: str) -> None:
    deadline = time.monotonic() + TIMEOUT
    while not ready():
        assert launched.poll() is None, f"the run ended (exit {launched.returncode}) before {what}"
        assert time.monotonic() < deadline, f"no {what} in {TIMEOUT} s"
        time.sleep(0.1)


def _children(pid: int) -> list[int]:
    """The launcher's processes (``python -m qk_jax.train``, one per JAX process), in start order."""
    with open(f"/proc/{pid}/task/{pid}/children") as f:
        return [int(c) for c in f.read().split()]


def _interrupted(stage: str, workdir: str, root, devices: int = 4) -> dict[str, str]:
    """Starts the two-process run of ``stage``, stops it once (stage 1: SIGTERM to process 1 alone after the first
    step; stage 2: SIGKILL to both after the checkpoint of step 2), reruns it to the end; the logs of both runs."""
    command, env = _command(2, devices, workdir, stage, root)
    launched = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    if stage == "stage1":
        _wait_until(lambda: "step 1/" in _logs(workdir, 2)[0], launched, "step 1")
        os.kill(_children(launched.pid)[1], signal.SIGTERM)  # a scheduler's notice to one host only
        _finish(launched, workdir, 2)
    else:
        committed = storage.join(workdir, "checkpoints", "2", "commit_success.txt")  # Orbax's marker in a bucket
        _wait_until(lambda: storage.exists(committed), launched, "checkpoint 2")
        for pid in _children(launched.pid):
            os.kill(pid, signal.SIGKILL)
        launched.kill()
        launched.communicate()
    stopped = "\n".join(_logs(workdir, 2))
    _finish(subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True),
            workdir, 2)
    return dict(stopped=stopped, resumed="\n".join(_logs(workdir, 2)))


@pytest.fixture(scope="module")
def bucket(tmp_path_factory):
    """``gs://bucket`` in memory on localhost for this module; this process and its subprocesses talk to it, and
    the launcher writes a bucket run's logs to ``$LOG_DIR``."""
    host = str(tmp_path_factory.mktemp("bucket_host"))
    with gcs_emulator.bucket_environment(host, LOG_DIR=os.path.join(host, "logs")) as uri:
        yield uri


@pytest.fixture(scope="module")
def runs(tmp_path_factory, bucket):
    """``(one, two, logs)``: the one-process runs' local root, the two-process runs' root in the bucket, and the
    logs of the interrupted two-process stages (``stopped`` and ``resumed``)."""
    one, two = str(tmp_path_factory.mktemp("multiprocess")), storage.join(bucket, "two")
    logs = {}
    for stage in STAGES:
        command, env = _command(1, 8, os.path.join(one, stage), stage, one)
        out = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=TIMEOUT)
        assert out.returncode == 0, out.stderr[-4000:]
        workdir = storage.join(two, stage)
        if stage in ("stage1", "stage2"):
            logs[stage] = _interrupted(stage, workdir, two)
        else:
            command, env = _command(2, 4, workdir, stage, two)
            _finish(subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     text=True), workdir, 2)
    return one, two, logs


@pytest.mark.parametrize("stage", list(STAGES))
def test_two_processes_train_as_one(runs, stage):
    one, two, _ = runs
    local, remote = os.path.join(one, stage), storage.join(two, stage)
    log_one, log_two = metrics.read_jsonl(os.path.join(local, metrics.JSONL)), metrics.read_jsonl(
        storage.join(remote, metrics.JSONL))
    assert sorted(log_one) == sorted(log_two) == list(range(1, STAGES[stage] + 1))
    for step in log_one:
        for key in ("loss", "grad_norm"):
            np.testing.assert_allclose(log_two[step][key], log_one[step][key], rtol=1e-5,
                                       err_msg=f"{stage} step {step} {key}")
    _, params_one, meta = saved_model.load_model(os.path.join(local, "final"))
    _, params_two, _ = saved_model.load_model(storage.join(remote, "final"))
    flat_one, flat_two = flatten(params_one), flatten(params_two)
    assert flat_one.keys() == flat_two.keys() and meta["step"] == STAGES[stage]
    for path, value in flat_one.items():
        np.testing.assert_allclose(flat_two[path], value, rtol=1e-5, atol=1e-6, err_msg=path)


def _stopped_step(logs: dict[str, str]) -> int:
    """The step both processes named when SIGTERM stopped stage 1 (JAX's preemption sync point)."""
    lines = [line for line in logs["stopped"].splitlines() if "stopped by SIGTERM" in line]
    steps = {line.split("after step ")[1].split(",")[0] for line in lines}
    assert len(steps) == 1 and len(lines) == 2, logs["stopped"][-3000:]
    return int(steps.pop())


def test_sigterm_to_one_process_stops_both_at_one_saved_step(runs):
    _, two, logs = runs
    step = _stopped_step(logs["stage1"])
    assert 1 <= step < STAGES["stage1"] and f"resumed from step {step}" in logs["stage1"]["resumed"]
    assert f"saved in {storage.join(two, 'stage1')}" in logs["stage1"]["stopped"]
    # One metrics log across the stop: each run marks where it started.
    lines = [json.loads(line) for line in storage.read_text(storage.join(two, "stage1", metrics.JSONL)).splitlines()]
    assert [r["step"] for r in lines if r.get("restart")] == [0, step]


def test_kill_9_of_both_resumes_from_the_last_checkpoint(runs):
    _, _, logs = runs
    resumed = logs["stage2"]["resumed"]
    assert "resumed from step 2" in resumed or "resumed from step 4" in resumed, resumed[-3000:]


def test_each_process_joined_with_its_share_of_the_devices(runs):
    _, two, _ = runs
    assert "process 1 of 2, 4 of 8 devices here" in _logs(storage.join(two, "stage3"), 2)[1]


def test_the_config_is_one_log_line_and_a_file(runs):
    _, two, _ = runs
    log = _logs(storage.join(two, "stage3"), 2)[0]
    assert "config: stage 3, batch_size 8, total_steps 3" in log and "!!python" not in log
    saved = metrics.read_run_config(storage.join(two, "stage3"))
    assert saved.stage == 3 and saved.total_steps == 3 and saved.init_from == storage.join(two, "stage2")


def test_cluster_detection_reads_the_environment():
    env = dict(JAX_COORDINATOR_ADDRESS="127.0.0.1:1", JAX_NUM_PROCESSES="2", JAX_PROCESS_ID="1")
    assert distributed.cluster_detected(env) and distributed.cluster_detected({"SLURM_NTASKS": "4"})
    assert distributed.cluster_detected({"TPU_WORKER_HOSTNAMES": "a,b"}) and distributed.cluster_detected(
        {"QK_JAX_DISTRIBUTED": "1"})
    assert not distributed.cluster_detected({"SLURM_NTASKS": "1", "TPU_WORKER_HOSTNAMES": "a"})


def _manifest(tmp_path, sizes) -> str:
    """A t2i manifest with one record per ``(width, height)`` image of ``sizes``, in that order."""
    from PIL import Image

    (tmp_path / "img").mkdir()
    lines = []
    for i, (width, height) in enumerate(sizes):
        Image.new("RGB", (width, height), (200, 30, 30)).save(tmp_path / "img" / f"{i}.png")
        lines.append(json.dumps(dict(id=f"r{i}", task="t2i", prompt=f"a red circle {i}", target=f"img/{i}.png")))
    (tmp_path / "train.jsonl").write_text("\n".join(lines) + "\n")
    return str(tmp_path / "train.jsonl")


def test_processes_reading_differently_shaped_batches_stop_with_the_fix_named(tmp_path):
    # Per-process reading of a manifest that buckets differently on each process (process 0 reads the even records,
    # all square; process 1 the odd ones, all 2:1): both stop at step 1, before compiling, with one clear error
    # (exit 2). Without the check both trained to the end (exit 0), each on a global batch of its own shape. Unset,
    # global_stream reads the global stream for a manifest (test_pipeline.py).
    manifest = _manifest(tmp_path, [(32, 32) if i % 2 == 0 else (64, 32) for i in range(8)])
    workdir = str(tmp_path / "run")
    env = dict(os.environ, PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", ""))
    out = subprocess.run(["bash", "launch/local_processes.sh", "2", "2", "--config", "configs/stage1.py:tiny",
                          "--workdir", workdir, "--config.batch_size=4", "--config.total_steps=2",
                          f"--config.data.manifest={manifest}", "--config.data.global_stream=False"],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=TIMEOUT)
    logs = [open(f"{workdir}.process{i}.log").read() for i in range(2)]
    assert out.returncode == 2, logs[0][-3000:]
    for log in logs:
        assert "each process reads its own records" in log
        assert "step 1: the processes read batches of different shapes" in log, log[-3000:]
        assert "--config.data.global_stream=True" in log and "Traceback" not in log


def test_a_manifest_of_mixed_sizes_trains_on_two_processes_as_on_one(tmp_path):
    # The default for a manifest (rows mode): both processes plan the same global batches from the image headers
    # and each decodes its own rows, so the run that the check above stops trains, with the per-step losses of one
    # process planning the same way (data.decode_own_rows=True) on 4 devices.
    manifest = _manifest(tmp_path, [(32, 32) if i % 2 == 0 else (64, 32) for i in range(8)])
    args = ["--config", "configs/stage1.py:tiny", "--config.batch_size=4", "--config.total_steps=4",
            f"--config.data.manifest={manifest}"]
    env = dict(os.environ, PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", ""))
    two = str(tmp_path / "two")
    out = subprocess.run(["bash", "launch/local_processes.sh", "2", "2", *args, "--workdir", two], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=TIMEOUT)
    logs = _logs(two, 2)
    assert out.returncode == 0, logs[0][-3000:] + logs[1][-3000:]
    assert "decodes its own rows" in logs[0]
    one = str(tmp_path / "one")
    single = subprocess.run([sys.executable, "-m", "qk_jax.train", *args, "--config.data.decode_own_rows=True",
                             "--workdir", one], cwd=ROOT, env=fake_devices_env(4), capture_output=True, text=True,
                            timeout=TIMEOUT)
    assert single.returncode == 0, single.stderr[-3000:]
    a, b = metrics.read_jsonl(os.path.join(two, metrics.JSONL)), metrics.read_jsonl(os.path.join(one, metrics.JSONL))
    assert sorted(a) == sorted(b) == [1, 2, 3, 4]
    np.testing.assert_allclose([a[s]["loss"] for s in a], [b[s]["loss"] for s in a], rtol=1e-5)
