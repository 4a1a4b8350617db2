"""Metrics: JSONL flushed per write and deduplicated on resume, TensorBoard events read back, the PNG plot,
the progress line against a fake clock, per-task means, durations."""

import glob
import json
import math
import os
import struct
import sys
import time

import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from qk_jax.data.tasks import TASKS
from qk_jax.training import metrics as m


def _read_events(path):
    """Decode an event file by hand: TFRecord framing (length, masked CRC32C, data, masked CRC32C) around
    ``Event`` protos; every CRC is checked."""
    from tensorboardX.proto.event_pb2 import Event
    from tensorboardX.record_writer import masked_crc32c

    events = []
    with open(path, "rb") as f:
        data = f.read()
    pos = 0
    while pos < len(data):
        header = data[pos : pos + 8]
        (length,) = struct.unpack("Q", header)
        assert struct.unpack("I", data[pos + 8 : pos + 12])[0] == masked_crc32c(header)
        body = data[pos + 12 : pos + 12 + length]
        assert struct.unpack("I", data[pos + 12 + length : pos + 16 + length])[0] == masked_crc32c(body)
        events.append(Event.FromString(body))
        pos += 16 + length
    return events


def _scalars(events):
    return [(e.step, v.tag, v.simple_value) for e in events if e.HasField("summary") for v in e.summary.value]


def test_jsonl_is_on_disk_after_each_write_and_takes_jax_and_numpy_scalars(tmp_path):
    with m.MetricsWriter(tmp_path, tensorboard=False) as writer:
        writer.write(10, {"loss": jnp.float32(0.5), "lr": np.float64(1e-4), "loss/t2i": 0.25})
        # Read through a separate handle while the writer is still open: the line is already there.
        lines = (tmp_path / m.JSONL).read_text().splitlines()
        assert len(lines) == 1
        record = json.loads(lines[0])
        assert record["step"] == 10 and record["loss"] == 0.5 and record["lr"] == 1e-4 and record["loss/t2i"] == 0.25
        assert abs(record["walltime"] - time.time()) < 60
        writer.write(20, {"loss": float("nan"), "grad_norm": float("inf")})
        lines = (tmp_path / m.JSONL).read_text().splitlines()
        assert len(lines) == 2
        strict = json.loads(lines[1], parse_constant=lambda name: pytest.fail(f"{name} is not JSON"))
        assert strict["loss"] is None and strict["grad_norm"] is None  # non-finite: null
    assert not (tmp_path / m.TB_DIR).exists()
    assert math.isnan(m.read_jsonl(tmp_path / m.JSONL)[20]["loss"])


def test_write_rejects_reserved_names_and_arrays(tmp_path):
    with m.MetricsWriter(tmp_path, tensorboard=False) as writer:
        with pytest.raises(ValueError, match="'step'"):
            writer.write(1, {"step": 3.0})
        with pytest.raises(ValueError, match="'loss' must be a scalar"):
            writer.write(1, {"loss": np.ones(3)})


def test_resumed_run_appends_and_reader_drops_the_crashed_overlap(tmp_path):
    with m.MetricsWriter(tmp_path, tensorboard=False, start_step=0) as writer:  # crashes after logging step 30
        for step in (10, 20, 30):
            writer.write(step, {"loss": 1.0 / step, "lr": 0.1})
    # The crash cut a line short: the resumed writer must not glue its first line onto it.
    with open(tmp_path / m.JSONL, "a") as f:
        f.write('{"step": 40, "lo')
    with m.MetricsWriter(tmp_path, tensorboard=False, start_step=20) as writer:  # resumes from the step-20 checkpoint
        for step in (30, 40):
            writer.write(step, {"loss": 2.0 / step})
    assert len((tmp_path / m.JSONL).read_text().splitlines()) == 8  # 2 restart lines, 1 broken line
    with pytest.warns(UserWarning, match=r"metrics.jsonl:5: skipping"):
        records = m.read_jsonl(tmp_path / m.JSONL)
    assert records == {10: {"loss": 0.1, "lr": 0.1}, 20: {"loss": 0.05, "lr": 0.1}, 30: {"loss": 2.0 / 30},
                       40: {"loss": 0.05}}  # the crashed run's lr at step 30 is gone with it
    steps, values = m.series(records, "loss")
    np.testing.assert_array_equal(steps, [10, 20, 30, 40])
    np.testing.assert_allclose(values, [0.1, 0.05, 2.0 / 30, 0.05])
    assert m.series(records, "lr")[0].tolist() == [10, 20]


def test_reader_keeps_the_last_value_per_step_and_name_without_restart_marks(tmp_path):
    for value in (1.0, 2.0):
        with m.MetricsWriter(tmp_path, tensorboard=False) as writer:
            writer.write(5, {"loss": value, f"extra{value:.0f}": value})
    assert m.read_jsonl(tmp_path / m.JSONL) == {5: {"loss": 2.0, "extra1": 1.0, "extra2": 2.0}}


def test_tensorboard_event_files_hold_the_scalars(tmp_path):
    from tensorboardX.proto.event_pb2 import SessionLog

    with m.MetricsWriter(tmp_path, start_step=0) as writer:
        writer.write(1, {"loss": 0.75, "loss/edit": 0.5})
        files = glob.glob(str(tmp_path / m.TB_DIR / "events.out.tfevents.*"))
        assert len(files) == 1
        assert _scalars(_read_events(files[0])) == [(1, "loss", 0.75), (1, "loss/edit", 0.5)]  # on disk already
        writer.write(2, {"loss": 0.25})
    events = _read_events(files[0])
    assert events[0].file_version == "brain.Event:2"
    assert events[1].session_log.status == SessionLog.START and events[1].step == 1  # points from step 1 on are new
    assert _scalars(events) == [(1, "loss", 0.75), (1, "loss/edit", 0.5), (2, "loss", 0.25)]


def test_tensorboard_reads_the_run_and_drops_the_crashed_overlap(tmp_path):
    """TensorBoard's own reader, independent of tensorboardX: a run resumed from step 20 (a second event file)
    replaces the points the crashed run logged after step 20."""
    event_accumulator = pytest.importorskip(
        "tensorboard.backend.event_processing.event_accumulator",
        reason="the tensorboard package is not installed; the event files are still checked by hand above",
    )
    with m.MetricsWriter(tmp_path, start_step=0) as writer:
        for step in (10, 20, 30):
            writer.write(step, {"loss": 1.0, "lr": 0.5})
    with m.MetricsWriter(tmp_path, start_step=20) as writer:
        for step in (30, 40):
            writer.write(step, {"loss": 2.0})
    assert len(os.listdir(tmp_path / m.TB_DIR)) == 2
    acc = event_accumulator.EventAccumulator(str(tmp_path / m.TB_DIR))
    acc.Reload()
    assert sorted(acc.Tags()["scalars"]) == ["loss", "lr"]
    assert [(e.step, e.value) for e in acc.Scalars("loss")] == [(10, 1.0), (20, 1.0), (30, 2.0), (40, 2.0)]
    assert [(e.step, e.value) for e in acc.Scalars("lr")] == [(10, 0.5), (20, 0.5)]


def test_optional_libraries_are_needed_only_when_used(tmp_path, monkeypatch):
    for name in list(sys.modules):  # a None entry makes the import of that module fail
        if name.split(".")[0] in ("tensorboardX", "matplotlib"):
            monkeypatch.setitem(sys.modules, name, None)
    monkeypatch.setitem(sys.modules, "tensorboardX", None)
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with m.MetricsWriter(tmp_path, tensorboard=False, start_step=0) as writer:
        writer.write(1, {"loss": 1.0})
    assert m.read_jsonl(tmp_path / m.JSONL) == {1: {"loss": 1.0}}
    with pytest.raises(ImportError, match="needs tensorboardX: `pip install tensorboardX`, or pass tensorboard=False"):
        m.MetricsWriter(tmp_path)
    with pytest.raises(ImportError):
        m.plot(tmp_path / m.JSONL, tmp_path / "loss.png")


def test_plot_writes_a_png_of_the_requested_size(tmp_path):
    with m.MetricsWriter(tmp_path, tensorboard=False) as writer:
        for step in range(1, 51):
            writer.write(step, {"loss": 1.0 / step, "loss/t2i": 1.1 / step, "loss/edit": 0.9 / step, "lr": 1e-4})
    png = tmp_path / "loss.png"
    assert m.plot(tmp_path / m.JSONL, png, keys=("loss", r"loss/.*"), size=(640, 400)) == [
        "loss", "loss/edit", "loss/t2i"
    ]
    with Image.open(png) as image:
        assert image.format == "PNG" and image.size == (640, 400)
        pixels = np.asarray(image.convert("L"))
    assert pixels.min() < 128 < pixels.max()  # something is drawn on the white background
    # A bare "loss" is matched in full: the per-task curves are not drawn.
    assert m.plot(tmp_path / m.JSONL, tmp_path / "total.png") == ["loss"]
    with pytest.raises(ValueError, match=r"no metric .* matches \('gnorm',\); it has \['loss', 'loss/edit'"):
        m.plot(tmp_path / m.JSONL, tmp_path / "none.png", keys=("gnorm",))


class FakeClock:
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


def test_progress_prints_every_n_and_the_last_step_with_throughput_from_the_window():
    clock, lines = FakeClock(), []
    progress = m.Progress(25, every=10, print_fn=lines.append, clock=clock)
    printed = {}
    for step in range(1, 26):
        clock.now += 60.0 if step == 1 else 2.0  # the first step compiles for a minute; then 2 s per step
        scalars = {"loss": 0.41234, "loss/t2i": 0.41, "loss/edit": 0.39, "lr": 1e-4, "grad_norm": 0.87,
                   "nonfinite": 0}
        line = progress.update(step, scalars, images_in_step=8)
        if line is not None:
            printed[step] = line
    assert list(printed) == [10, 20, 25] and lines == list(printed.values())
    # Window of step 10: steps 2..10 (9 steps, 18 s, 72 images); the compile minute is not in it.
    assert printed[10] == (
        "step 10/25 | loss 0.4123 | t2i 0.41 edit 0.39 | lr 1.0e-04 | gnorm 0.87 | nonfinite 0 | 4 img/s | "
        "0.5 it/s | ETA 30.0s"
    )
    # Window of step 20: 10 steps in 20 s; 5 steps left at 2 s each.
    assert printed[20].endswith("| 4 img/s | 0.5 it/s | ETA 10.0s")
    assert printed[25].endswith("| 4 img/s | 0.5 it/s | ETA 0.0s")


def test_progress_resumed_first_line_has_no_throughput_when_its_window_is_empty():
    clock, lines = FakeClock(), []
    progress = m.Progress(10_000, start_step=500, every=1, print_fn=lines.append, clock=clock)
    clock.now += 30.0
    assert progress.update(501, {"loss": 1.0}, 16) == "step 501/10000 | loss 1.0000"
    clock.now += 0.5
    assert progress.update(502, {"loss": 1.0}, 16) == (
        "step 502/10000 | loss 1.0000 | 32 img/s | 2 it/s | ETA 1h19m09s"
    )
    assert len(lines) == 2


def test_progress_called_only_on_printing_steps_counts_the_images_since_the_previous_call():
    clock, lines = FakeClock(), []
    progress = m.Progress(40, every=10, print_fn=lines.append, clock=clock)
    clock.now += 60.0 + 9 * 2.0  # steps 1..10, with the compile
    assert progress.update(10, {"loss": 0.5}, images_in_step=80) == "step 10/40 | loss 0.5000"
    clock.now += 10 * 4.0  # steps 11..20
    assert progress.update(20, {"loss": 0.5}, images_in_step=80) == (
        "step 20/40 | loss 0.5000 | 2 img/s | 0.25 it/s | ETA 1m20s"
    )


def test_progress_rejects_bad_arguments():
    with pytest.raises(ValueError, match="start_step <= total_steps"):
        m.Progress(10, start_step=11)
    with pytest.raises(ValueError, match="every >= 1"):
        m.Progress(10, every=0)


def test_per_task_losses_averages_and_leaves_out_tasks_without_samples():
    sums = np.zeros(len(TASKS), np.float32)
    counts = np.zeros(len(TASKS), np.float32)
    sums[TASKS.index("t2i")], counts[TASKS.index("t2i")] = 3.0, 4.0
    sums[TASKS.index("subject_edit")], counts[TASKS.index("subject_edit")] = 1.0, 2.0
    assert m.task_losses(jnp.asarray(sums), jnp.asarray(counts)) == {"loss/t2i": 0.75, "loss/subject_edit": 0.5}
    assert m.task_losses([1.0, 2.0], [1.0, 0.0], tasks=("a", "b"), prefix="") == {"a": 1.0}
    with pytest.raises(ValueError, match=r"must both be \(7,\)"):
        m.task_losses(sums[:3], counts[:3])


@pytest.mark.parametrize(
    "seconds, text",
    [(0.0, "0.0s"), (4.24, "4.2s"), (59.9, "59.9s"), (59.97, "1m00s"), (1085, "18m05s"), (3723, "1h02m03s"),
     (3600 * 30 + 5, "30h00m05s")],
)
def test_format_duration(seconds, text):
    assert m.format_duration(seconds) == text


def test_format_duration_rejects_negative_and_nan():
    with pytest.raises(ValueError, match="finite number of seconds"):
        m.format_duration(-1.0)
    with pytest.raises(ValueError, match="finite number of seconds"):
        m.format_duration(float("nan"))


def test_the_run_config_is_saved_whole_and_logged_as_one_line(tmp_path):
    from configs import shapes, stage1

    config = stage1.get_config("tiny")
    path = m.save_run_config(config, tmp_path / "run")
    assert path == str(tmp_path / "run" / m.RUN_CONFIG)
    back = m.read_run_config(tmp_path / "run")
    assert back.to_dict() == json.loads(config.to_json_best_effort())  # every key, tuples as lists
    assert back.stage == 1 and back.mesh == [["data", -1], ["fsdp", 1], ["tensor", 1]]
    line = m.config_summary(config)
    assert "\n" not in line and line.startswith("stage 1, batch_size 2, total_steps 2, resolution 32, mesh {")
    assert m.config_summary(shapes.get_config("tiny")) == "curriculum of 3 stages: stage1, stage2, stage3"
    (tmp_path / "run" / m.RUN_CONFIG).write_text("{broken")
    with pytest.raises(ValueError, match="config.json: not valid JSON"):
        m.read_run_config(tmp_path / "run")


def test_progress_names_its_stage_and_leaves_out_steps_that_compiled():
    """A new batch shape at step 13 compiles for a minute: ``restart(13)`` leaves it out, so the line at step 20
    has the rate of steps 14..20 only (7 steps, their images), and its ETA too."""
    clock, lines = FakeClock(), []
    progress = m.Progress(40, every=10, print_fn=lines.append, clock=clock, name="stage 2")
    clock.now += 60.0 + 9 * 2.0
    assert progress.update(10, {"loss": 0.5}, images_in_step=80) == "stage 2 | step 10/40 | loss 0.5000"
    clock.now += 2 * 2.0 + 60.0 + 2.0  # steps 11, 12, then 13 with its compile
    progress.restart(13)
    clock.now += 7 * 2.0  # steps 14..20
    assert progress.update(20, {"loss": 0.5}, images_in_step=80) == (
        "stage 2 | step 20/40 | loss 0.5000 | 4 img/s | 0.5 it/s | ETA 40.0s")
    clock.now += 9 * 2.0 + 60.0  # steps 21..29, then 30 compiles: a window of no other step shows no rate
    progress.restart(30)
    assert progress.update(30, {"loss": 0.5}, images_in_step=80) == "stage 2 | step 30/40 | loss 0.5000"


def test_progress_adds_the_curriculum_eta_from_the_later_work_at_this_pace():
    # 2 s per step, 5 steps left (10 s) and later work of 300 steps' worth at this pace (600 s): ~10m10s in all.
    clock, lines, asked = FakeClock(), [], []
    progress = m.Progress(25, every=10, print_fn=lines.append, clock=clock, name="stage 2",
                          later=lambda seconds_per_step: asked.append(seconds_per_step) or 300 * seconds_per_step)
    for step in range(1, 21):
        clock.now += 2.0
        progress.update(step, {"loss": 0.5})
    assert lines[-1] == "stage 2 | step 20/25 | loss 0.5000 | 0 img/s | 0.5 it/s | ETA 10.0s | curriculum ETA ~10m10s"
    assert asked[-1] == pytest.approx(2.0)
