"""``qk_jax.storage``: local paths and ``gs://`` URIs through one set of operations. Against a local GCS emulator
(``gcs_emulator``): a bucket workdir trains, stops on SIGTERM and resumes exactly as a local one. Two processes
training into a bucket are tests/test_multiprocess.py's; the whole curriculum in a bucket is
tests/test_curriculum.py's."""

import json
import os
import signal
import subprocess
import sys
from unittest import mock

import chex
import numpy as np
import pytest

import gcs_emulator
from qk_jax import storage

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_uris_stay_uris_and_local_paths_become_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert storage.resolve("gs://bucket/run/") == "gs://bucket/run"  # not /cwd/gs:/bucket/run
    assert storage.resolve("run") == str(tmp_path / "run")
    assert storage.is_remote("gs://b/r") and storage.is_remote("s3://b/r") and not storage.is_remote("/a/gs://b")
    assert storage.is_absolute("gs://b/r") and storage.is_absolute("/x") and not storage.is_absolute("stage1")
    assert storage.join("gs://b/run", "stage1", "final") == "gs://b/run/stage1/final"
    assert storage.join("run", "final") == str(tmp_path / "run" / "final")


def test_write_whole_locally_leaves_no_partial_file(tmp_path):
    target = tmp_path / "new" / "config.json"
    storage.write_whole(target, "{}")
    storage.write_whole(target, b"[1]")
    assert target.read_bytes() == b"[1]" and os.listdir(target.parent) == ["config.json"]
    synced = []
    with mock.patch.object(os, "fsync", side_effect=lambda fd: synced.append(os.fstat(fd).st_size)):
        storage.write_whole(target, b"[1, 2]", sync=True)
    # Flushed and on the disk whole before the rename.
    assert synced == [6] and target.read_bytes() == b"[1, 2]" and os.listdir(target.parent) == ["config.json"]


def test_a_mirror_is_per_uri_and_a_local_path_is_its_own(tmp_path, monkeypatch):
    monkeypatch.setenv("QK_JAX_MIRROR", str(tmp_path / "mirrors"))
    a, b = storage.local_mirror("gs://b/run/stage1"), storage.local_mirror("gs://b/run/stage2")
    assert a != b and os.path.isdir(a) and a.startswith(str(tmp_path / "mirrors"))
    assert storage.local_mirror(tmp_path / "here") == str(tmp_path / "here")


@pytest.fixture
def bucket(tmp_path):
    """An in-memory ``gs://bucket`` on localhost; this process and its subprocesses talk to it."""
    with gcs_emulator.bucket_environment(str(tmp_path / "host")) as uri:
        yield uri


def test_operations_on_a_bucket(bucket, tmp_path):
    run = storage.join(bucket, "ops")
    storage.write_whole(storage.join(run, "a", "x.txt"), "one")
    assert storage.read_text(storage.join(run, "a", "x.txt")) == "one"
    storage.copy_file(storage.join(run, "a", "x.txt"), tmp_path / "down.txt")  # bucket -> host
    storage.copy_file(tmp_path / "down.txt", storage.join(run, "b", "y.txt"))  # host -> bucket
    storage.move(storage.join(run, "b"), storage.join(run, "c"))
    assert storage.read_bytes(storage.join(run, "c", "y.txt")) == b"one"
    assert not storage.exists(storage.join(run, "b", "y.txt"))
    storage.rmtree(storage.join(run, "a"))
    storage.rmtree(storage.join(run, "absent"))  # nothing to remove: no error
    assert not storage.exists(storage.join(run, "a", "x.txt"))


def _train(workdir, *extra, stage=1, popen=False, env=None):
    cmd = [sys.executable, "-m", "qk_jax.train", "--config", f"configs/stage{stage}.py:tiny", f"--workdir={workdir}",
           "--config.checkpoint_every=1000", "--config.log_every=1", *extra]
    if popen:
        return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    out = subprocess.run(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                         timeout=600)
    assert out.returncode == 0, out.stdout[-3000:]
    return out.stdout


def _bucket_files(prefix: str) -> set[str]:
    import fsspec

    fs = fsspec.filesystem("gcs")
    root = prefix.removeprefix("gs://")
    return {path.removeprefix(root + "/") for path in fs.find(root)}


def test_a_bucket_workdir_trains_stops_on_sigterm_and_resumes_as_a_local_one(bucket, tmp_path):
    from qk_jax.models import saved_model
    from qk_jax.training import metrics

    steps = 40  # tiny steps take ~30 ms: enough of them that SIGTERM lands mid-run
    env = dict(os.environ, QK_JAX_MIRROR=str(tmp_path / "mirror"), XDG_CACHE_HOME=str(tmp_path / "cache"))
    args = (f"--config.total_steps={steps}",)
    _train(tmp_path / "local", *args, env=env)

    remote = storage.join(bucket, "run", "stage1")
    proc = _train(remote, *args, popen=True, env=env)
    seen = ""
    while "step 2/" not in seen:  # the step is compiled and running: stop it there
        line = proc.stdout.readline()
        assert line, f"the run ended before step 2: {seen[-3000:]}"
        seen += line
    proc.send_signal(signal.SIGTERM)
    rest = proc.stdout.read()
    assert proc.wait(timeout=300) == 0, (seen + rest)[-3000:]
    stopped = [line for line in rest.splitlines() if "stopped by SIGTERM after step" in line]
    assert stopped, rest[-3000:]
    at = int(stopped[0].split("after step ")[1].split(",")[0])
    assert at < steps and f"saved in {remote}" in stopped[0]
    assert "resumed from step" not in seen
    resumed = _train(remote, *args, env=env)
    assert f"resumed from step {at}" in resumed, resumed[-3000:]

    # Every file the trainer writes is in the bucket; none went to a local folder named "gs:".
    files = _bucket_files(remote)
    for name in ("config.json", "metrics.jsonl", "loss.png", "final/config.json", f"checkpoints/{at}/state/_METADATA"):
        assert name in files, sorted(files)
    assert any(f.startswith("tb/events.out.tfevents.") for f in files) and any(f.startswith("frozen/") for f in files)
    assert any(f.startswith("final/params/") for f in files)
    assert not os.path.exists(os.path.join(ROOT, "gs:")) and not os.path.exists(tmp_path / "gs:")

    # The same run as the local one: losses step by step (one log across the stop) and the final params.
    local_log = metrics.read_jsonl(tmp_path / "local" / metrics.JSONL)
    remote_log = metrics.read_jsonl(storage.join(remote, metrics.JSONL))
    assert sorted(remote_log) == sorted(local_log) == list(range(1, steps + 1))
    np.testing.assert_allclose([remote_log[s]["loss"] for s in local_log], [local_log[s]["loss"] for s in local_log],
                               rtol=1e-6)
    lines = [json.loads(line) for line in storage.read_text(storage.join(remote, metrics.JSONL)).splitlines()]
    assert [r["step"] for r in lines if r.get("restart")] == [0, at]  # where each run started
    _, local_params, _ = saved_model.load_model(tmp_path / "local" / "final")
    _, remote_params, meta = saved_model.load_model(storage.join(remote, "final"))
    assert meta["step"] == steps
    chex.assert_trees_all_close(remote_params, local_params, rtol=1e-6, atol=1e-7)


def test_stage0_for_a_bucket_trains_in_a_local_mirror_and_copies_it_up_marker_last(bucket, tmp_path, monkeypatch):
    from qk_jax.training import stage0

    monkeypatch.setenv("QK_JAX_MIRROR", str(tmp_path / "mirror"))
    ran, uploads = [], []

    def run_here(config, directory):  # stands in for training: writes an export and the result file
        ran.append(directory)
        os.makedirs(os.path.join(directory, "vae_export"), exist_ok=True)
        open(os.path.join(directory, "vae_export", "model.safetensors"), "wb").write(b"weights")
        result = stage0.Result(vae=os.path.join(directory, "vae_export"), vlm=os.path.join(directory, "vae_export"),
                               scaling_factor=1.0, shift_factor=0.0, figures={})
        result.write(directory)
        return result

    copy_file = storage.copy_file
    monkeypatch.setattr(stage0, "_run_here", run_here)
    monkeypatch.setattr(storage, "copy_file", lambda s, t: (uploads.append(os.fspath(t)), copy_file(s, t)))
    directory = storage.join(bucket, "s0", stage0.DIRNAME)
    result = stage0.run(None, directory)
    assert ran == [storage.local_mirror(directory)] and result.vae.startswith(ran[0])  # read locally
    assert uploads == [f"{directory}/vae_export/model.safetensors", f"{directory}/{stage0.RESULT_FILE}"]
    assert storage.read_bytes(f"{directory}/vae_export/model.safetensors") == b"weights"
