"""What a training run shows and leaves behind: a progress line, a JSONL log, TensorBoard events and a PNG plot.

Layout of a stage's ``workdir`` (beside ``checkpoints/``, see ``qk_jax.training.checkpoint``)::

    workdir/metrics.jsonl        one JSON object per ``MetricsWriter.write``: {"step", "walltime", name: value},
                                 and {"step", "walltime", "restart": true} where a process started
    workdir/tb/events.out.tfevents.*   the same scalars for ``tensorboard --logdir workdir/tb``
    workdir/loss.png             ``plot`` of the JSONL, written by the trainer at the end
    workdir/config.json          the run's whole config (``save_run_config``; ``read_run_config`` reads it back)
    workdir/wandb_run_id         with ``config.wandb.enabled``: the W&B run the stage logs to (``WandbLogger``)

Every write is flushed and fsynced, so a crash loses no logged point. In a bucket workdir (``gs://``, which has
no append) both logs grow in a local mirror (``storage.local_mirror``) and are copied up whole at most every
``sync_every`` seconds, whenever the trainer saves a checkpoint, and on close: a crash there loses at most the
points after the last checkpoint, which the resumed run logs again from it. A resumed run appends to the same JSONL
and starts a new event file, both marked with the step it restarts from (its checkpoint's step): ``read_jsonl``
and TensorBoard (a ``SessionLog.START`` event) then drop the points the crashed run logged after that
checkpoint, and ``read_jsonl`` keeps the last value per (step, name), so neither shows the overlap twice.

Heavy or optional libraries are imported where they are used: ``tensorboardX`` (event files without
TensorFlow) only by a ``MetricsWriter`` with ``tensorboard=True``, ``matplotlib`` (Agg canvas, no pyplot) only by
``plot``, ``wandb`` only by a ``WandbLogger``. Only process 0 of a multi-host run should create a ``MetricsWriter``
or ``Progress``.
"""

from __future__ import annotations

import functools
import io
import json
import math
import os
import re
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from qk_jax import storage
from qk_jax.data.tasks import TASKS

JSONL = "metrics.jsonl"
TB_DIR = "tb"
# Fields of a JSONL line that are not metrics.
RESERVED = ("step", "walltime", "restart")


def _to_float(name: str, value: Any) -> float:
    """A Python float from a Python/NumPy/JAX scalar (a device array is fetched)."""
    array = np.asarray(value)
    if array.size != 1:
        raise ValueError(f"metric {name!r} must be a scalar, got an array of shape {array.shape}")
    return float(array.reshape(()))


class MetricsWriter:
    """Appends scalars to ``workdir/metrics.jsonl`` and, with ``tensorboard=True``, to event files in ``workdir/tb``.

    ``write(step, {"loss": 0.41, "loss/t2i": 0.40, "lr": 1e-4})`` adds one JSON line and one TensorBoard event
    (one summary value per name), both flushed to disk before it returns. Usable as a context manager.

    ``start_step`` is the step this process starts from: 0 for a new run, the restored checkpoint's step on
    resume. It is recorded in both logs so that readers drop the points an earlier process logged after it;
    ``None`` records nothing (a plain append).
    """

    def __init__(self, workdir: str | os.PathLike, *, tensorboard: bool = True, start_step: int | None = None,
                 wandb: Mapping[str, Any] | None = None, run_config: Mapping[str, Any] | None = None,
                 sync_every: float = 60.0):
        if tensorboard:
            # tensorboardX's synchronous record writer (its SummaryWriter queues events to a thread and a
            # multiprocessing queue, so a write would not be on disk when it returns).
            try:
                from tensorboardX.event_file_writer import EventsWriter
            except ImportError as e:
                raise ImportError(
                    "MetricsWriter(tensorboard=True) needs tensorboardX: `pip install tensorboardX`, or pass "
                    "tensorboard=False to log the JSONL only"
                ) from e
        # A bucket workdir (gs://) has no append: the logs grow in a local mirror and are copied up whole at most
        # every ``sync_every`` seconds, at each checkpoint and on close (``sync``); a resume starts from the bucket's
        # copy.
        self.workdir, self._remote = storage.resolve(workdir), storage.is_remote(workdir)
        self.sync_every, self._synced_at = float(sync_every), time.monotonic()
        local = storage.local_mirror(self.workdir)
        os.makedirs(local, exist_ok=True)
        self.jsonl_path = os.path.join(local, JSONL)
        if self._remote:
            if storage.exists(storage.join(self.workdir, JSONL)):
                storage.copy_file(storage.join(self.workdir, JSONL), self.jsonl_path)
            elif os.path.exists(self.jsonl_path):
                os.remove(self.jsonl_path)  # a mirror left by another run of that name
        # A run killed in the middle of a line leaves it without its newline: end it, so the first line of the
        # resumed run stays a line of its own (the reader skips the broken one).
        if os.path.exists(self.jsonl_path) and os.path.getsize(self.jsonl_path) > 0:
            with open(self.jsonl_path, "rb") as f:
                f.seek(-1, os.SEEK_END)
                needs_newline = f.read(1) != b"\n"
            if needs_newline:
                with open(self.jsonl_path, "ab") as f:
                    f.write(b"\n")
        self._jsonl = open(self.jsonl_path, "a", encoding="utf-8")
        self._events = None
        self.tb_dir = None
        if tensorboard:
            # The ns suffix keeps file names unique and in time order, the order TensorBoard reads them in.
            self.tb_dir = os.path.join(local, TB_DIR)
            os.makedirs(self.tb_dir, exist_ok=True)
            before = set(os.listdir(self.tb_dir))
            self._events = EventsWriter(os.path.join(self.tb_dir, "events"), f".{time.time_ns()}.{os.getpid()}")
            self._events_files = sorted(set(os.listdir(self.tb_dir)) - before)  # this writer's file, to copy up
        # W&B last: a failure to start it leaves no open file behind.
        self.wandb = WandbLogger(workdir, wandb, run_config) if wandb and wandb.get("enabled") else None
        if start_step is not None:
            self._restart(int(start_step))

    def _restart(self, step: int) -> None:
        """Mark that logging restarts after ``step``: later readers forget earlier points at steps > ``step``."""
        walltime = time.time()
        self._append({"step": step, "walltime": round(walltime, 3), "restart": True})
        if self._events is not None:
            from tensorboardX.proto.event_pb2 import Event, SessionLog

            # TensorBoard keeps the points at steps below a START event's step and drops the others.
            start = Event(wall_time=walltime, step=step + 1, session_log=SessionLog(status=SessionLog.START))
            self._events.write_event(start)
            self._events.flush()

    def _append(self, record: Mapping[str, Any]) -> None:
        # Strict JSON: a non-finite value is null (json.dumps would write a bare NaN that other readers refuse).
        record = {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in record.items()}
        self._jsonl.write(json.dumps(record, allow_nan=False) + "\n")
        self._jsonl.flush()
        os.fsync(self._jsonl.fileno())

    def write(self, step: int, scalars: Mapping[str, Any]) -> None:
        """Log ``scalars`` (name -> Python/NumPy/JAX scalar) at ``step``; NaN and inf go to the JSONL as ``null``
        (``read_jsonl`` reads them back as NaN) and to TensorBoard as such."""
        step = int(step)
        values = {}
        for name, value in scalars.items():
            if not isinstance(name, str) or name in RESERVED:
                raise ValueError(f"metric name {name!r} is not allowed: use a string other than {RESERVED}")
            values[name] = _to_float(name, value)
        walltime = time.time()
        self._append({"step": step, "walltime": round(walltime, 3), **values})
        if self._events is not None and values:
            from tensorboardX.proto.event_pb2 import Event
            from tensorboardX.proto.summary_pb2 import Summary

            summary = Summary(value=[Summary.Value(tag=name, simple_value=v) for name, v in values.items()])
            self._events.write_event(Event(wall_time=walltime, step=step, summary=summary))
            self._events.flush()  # fsyncs
        if self.wandb is not None and values:
            self.wandb.log(step, values)
        if self._remote and time.monotonic() - self._synced_at >= self.sync_every:
            self.sync()

    def sync(self) -> None:
        """Copy the logs up to a bucket workdir (whole files; nothing to do for a local one)."""
        if not self._remote:
            return
        storage.copy_file(self.jsonl_path, storage.join(self.workdir, JSONL))
        if self._events is not None:
            self._events.flush()
            for name in self._events_files:
                storage.copy_file(os.path.join(self.tb_dir, name), storage.join(self.workdir, TB_DIR, name))
        self._synced_at = time.monotonic()

    def write_image(self, step: int, tag: str, png: bytes, height: int, width: int) -> None:
        """A PNG-encoded RGB image at ``step`` in TensorBoard's images tab and W&B (the JSONL keeps scalars only)."""
        if self.wandb is not None:
            self.wandb.log_image(step, tag, png)
        if self._events is None:
            return
        from tensorboardX.proto.event_pb2 import Event
        from tensorboardX.proto.summary_pb2 import Summary

        image = Summary.Image(height=int(height), width=int(width), colorspace=3, encoded_image_string=png)
        summary = Summary(value=[Summary.Value(tag=tag, image=image)])
        self._events.write_event(Event(wall_time=time.time(), step=int(step), summary=summary))
        self._events.flush()
        if self._remote:
            self.sync()  # an image is rare and worth seeing at once

    def close(self) -> None:
        if not self._jsonl.closed:
            self.sync()
            self._jsonl.close()
        if self._events is not None:
            self._events.close()
            self._events = None
        if self.wandb is not None:
            self.wandb.close()
            self.wandb = None

    def __enter__(self) -> MetricsWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class WandbLogger:
    """One Weights & Biases run for one stage's ``workdir``: the scalars and images its ``MetricsWriter`` writes.

    ``block`` is ``config.wandb`` (``configs/common.py``: project, entity, group, mode). The run's id is kept in
    ``workdir/wandb_run_id``, so a resumed stage continues its run (``resume="allow"``); W&B drops points at
    steps below the run's last one, so the steps a crashed process logged after its checkpoint keep their first
    values there (the JSONL and TensorBoard replace them). The run is named after the stage's folder and its
    parent (``shapes/stage2``) and gets the whole config. Only ``MetricsWriter`` (process 0) creates one."""

    def __init__(self, workdir: str | os.PathLike, block: Mapping[str, Any], run_config: Mapping[str, Any] | None):
        try:
            import wandb
        except ImportError as e:
            raise ImportError("config.wandb.enabled needs Weights & Biases: `pip install wandb` (or "
                              "--config.wandb.enabled=False)") from e
        self._wandb = wandb
        workdir = storage.resolve(workdir)
        id_path = storage.join(workdir, WANDB_RUN_ID)
        if storage.exists(id_path):
            run_id = storage.read_text(id_path).strip()
        else:
            run_id = wandb.util.generate_id()
            storage.write_whole(id_path, run_id + "\n")
        name = "/".join(workdir.rstrip("/").split("/")[-2:])
        # W&B's own files stay on the host (a mirror for a bucket workdir); the run's data goes to W&B.
        self.run = wandb.init(project=block.get("project"), entity=block.get("entity"), group=block.get("group"),
                              mode=block.get("mode"), name=name, id=run_id, resume="allow",
                              dir=storage.local_mirror(workdir),
                              config=dict(run_config) if run_config is not None else None)

    def log(self, step: int, values: Mapping[str, float]) -> None:
        self.run.log(dict(values), step=int(step))

    def log_image(self, step: int, tag: str, png: bytes) -> None:
        from PIL import Image

        self.run.log({tag: self._wandb.Image(Image.open(io.BytesIO(png)).convert("RGB"))}, step=int(step))

    def close(self) -> None:
        self.run.finish()


WANDB_RUN_ID = "wandb_run_id"
RUN_CONFIG = "config.json"
SUMMARY_KEYS = ("stage", "batch_size", "total_steps", "resolution", "mesh", "init_from")


def save_run_config(config: Any, workdir: str | os.PathLike) -> str:
    """Write the run's whole config as ``workdir/config.json`` (written whole, then renamed); returns the path.
    The log gets ``config_summary`` instead of the config itself (hundreds of lines)."""
    path = storage.join(workdir, RUN_CONFIG)
    storage.write_whole(path, config.to_json_best_effort(indent=2, sort_keys=True))
    return path


def read_run_config(workdir: str | os.PathLike):
    """The ``ml_collections.ConfigDict`` that ``save_run_config`` wrote (tuples come back as lists)."""
    import ml_collections

    path = storage.join(workdir, RUN_CONFIG)
    try:
        return ml_collections.ConfigDict(json.loads(storage.read_text(path)))
    except (ValueError, RecursionError) as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None


def config_summary(config: Any) -> str:
    """One line for the log: the keys a reader looks for first (``SUMMARY_KEYS``, those the config has), or a
    curriculum's stage names."""
    if "stages" in config:
        names = [str(stage.get("name", i)) for i, stage in enumerate(config.stages)]
        return f"curriculum of {len(names)} stages: {', '.join(names)}"
    parts = []
    for key in SUMMARY_KEYS:
        if key in config and config[key] is not None:
            value = config[key]
            value = dict(value) if key == "mesh" else value
            parts.append(f"{key} {value}")
    return ", ".join(parts) or "no summary keys"


def read_jsonl(path: str | os.PathLike) -> dict[int, dict[str, float]]:
    """``{step: {name: value}}`` in step order from a metrics JSONL, as the last process that logged each step saw it.

    A restart line at step S drops the points read so far at steps > S (logged by a process that crashed before
    its next checkpoint), and the last value of each (step, name) wins. A line that is not a JSON object with an
    integer ``step`` (a write cut short by a kill) is skipped with a warning.
    """
    records: dict[int, dict[str, float]] = {}
    with storage.path(path).open("r", encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
                step = obj.pop("step")
                if not isinstance(step, int):
                    raise TypeError(step)
            except (ValueError, TypeError, KeyError, AttributeError):
                warnings.warn(f"{path}:{lineno}: skipping a line that is not a metrics record: {line[:80]!r}")
                continue
            obj.pop("walltime", None)
            obj = {k: float("nan") if v is None else v for k, v in obj.items()}  # null: a non-finite value
            if obj.pop("restart", False):
                records = {s: row for s, row in records.items() if s <= step}
            elif obj:
                records.setdefault(step, {}).update(obj)
    return dict(sorted(records.items()))


def series(records: Mapping[int, Mapping[str, float]], name: str) -> tuple[np.ndarray, np.ndarray]:
    """``(steps [n] int64, values [n] float64)`` of one metric from ``read_jsonl``'s result, in step order."""
    points = [(step, row[name]) for step, row in records.items() if name in row]
    steps = np.array([s for s, _ in points], np.int64)
    values = np.array([v for _, v in points], np.float64)
    return steps, values


def plot(
    jsonl_path: str | os.PathLike,
    png_path: str | os.PathLike,
    keys: Sequence[str] = ("loss",),
    *,
    title: str | None = None,
    size: tuple[int, int] = (1000, 600),
) -> list[str]:
    """Draw metric curves from a metrics JSONL into a ``size`` (width, height in pixels) PNG; x is the step.

    ``keys`` are regexes matched in full against metric names: ``("loss",)`` is the total loss only,
    ``("loss", r"loss/.*")`` adds every per-task loss to the same figure. One line per matched name; the y axis
    is logarithmic when every plotted value is positive. Non-finite points are left out. Returns the names
    plotted; raises ValueError when no name matches.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    records = read_jsonl(jsonl_path)
    available = sorted({name for row in records.values() for name in row})
    names: list[str] = []
    for pattern in keys:
        names += [n for n in available if re.fullmatch(pattern, n) and n not in names]
    if not names:
        raise ValueError(f"no metric in {jsonl_path} matches {tuple(keys)}; it has {available}")

    dpi = 100
    fig = Figure(figsize=(size[0] / dpi, size[1] / dpi), dpi=dpi)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    all_positive = True
    for name in names:
        steps, values = series(records, name)
        finite = np.isfinite(values)
        steps, values = steps[finite], values[finite]
        all_positive &= bool(np.all(values > 0))
        first = name == names[0]  # the total loss when asked for first: drawn thicker, on top
        ax.plot(steps, values, label=name, linewidth=1.6 if first else 0.9, zorder=3 if first else 2)
    if all_positive:
        ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("loss" if all(n.startswith("loss") for n in names) else "value")
    run = storage.path(jsonl_path).parent.name
    ax.set_title(title if title is not None else f"{run}: {', '.join(names)}")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(loc="upper right", fontsize="small")
    png = io.BytesIO()
    fig.savefig(png, dpi=dpi, format="png")
    storage.write_whole(png_path, png.getvalue())
    return names


def task_losses(
    task_loss_sum: Any, task_count: Any, tasks: Sequence[str] = TASKS, prefix: str = "loss/"
) -> dict[str, float]:
    """``{'loss/t2i': mean, ...}`` from per-task loss sums and sample counts (``[len(tasks)]`` each, e.g. the
    model's ``task_loss_sum``/``task_count`` summed over the steps since the last log); tasks without samples
    are left out rather than reported as 0."""
    sums = np.asarray(task_loss_sum, np.float64)
    counts = np.asarray(task_count, np.float64)
    if sums.shape != (len(tasks),) or counts.shape != (len(tasks),):
        raise ValueError(
            f"task_loss_sum {sums.shape} and task_count {counts.shape} must both be ({len(tasks)},), one entry "
            f"per task of {tuple(tasks)}"
        )
    return {f"{prefix}{task}": float(s / c) for task, s, c in zip(tasks, sums, counts) if c > 0}


def format_duration(seconds: float) -> str:
    """'1h02m03s', '18m05s' or '4.2s'."""
    if not math.isfinite(seconds) or seconds < 0:
        raise ValueError(f"a duration must be a finite number of seconds >= 0, got {seconds}")
    if seconds < 59.95:
        return f"{seconds:.1f}s"
    total = round(seconds)
    hours, rest = divmod(total, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}h{minutes:02d}m{secs:02d}s" if hours else f"{minutes}m{secs:02d}s"


def _rate(x: float) -> str:
    return f"{x:.3g}" if x < 100 else f"{x:.0f}"


class Progress:
    """One progress line every ``every`` steps and on the last step.

    ``update(step, scalars, images_in_step)`` is called after a step (``step`` counts completed steps,
    ``start_step + 1`` is the first of this process), with the images of the steps since the previous update:
    after every step (one step's images), or only on the steps that print (``every`` steps' images). A printed
    line reads::

        step 120/1000 | loss 0.4123 | t2i 0.41 edit 0.39 | lr 1.0e-04 | gnorm 0.87 | 12.3 img/s | 0.81 it/s | ETA 18m05s

    Throughput and ETA come from the wall-clock (``clock``, ``time.perf_counter`` unless a test injects one)
    over the steps since the previous line. The window starts at the first update of the process, so what came
    before it (the first step's tracing and XLA compilation) never counts: called every step, the first line
    already has a throughput; called only on printing steps, the first line has none (its window is empty).
    ETA is the remaining steps at the window's seconds per step. With JAX's asynchronous dispatch the clock
    measures device time when the caller has fetched the step's metrics before the update of a line.

    ``later(seconds_per_step)``, when given, is how long the work after this run takes at this run's pace (a
    curriculum's later stages, ``loop.train_stage``); the line then ends with ``curriculum ETA ~1h05m``: this
    run's ETA plus that.
    """

    def __init__(
        self,
        total_steps: int,
        *,
        start_step: int = 0,
        every: int = 10,
        print_fn: Callable[[str], Any] = functools.partial(print, flush=True),
        clock: Callable[[], float] = time.perf_counter,
        name: str = "",
        later: Callable[[float], float] | None = None,
    ):
        if not 0 <= start_step <= total_steps or every < 1:
            raise ValueError(
                f"Progress needs 0 <= start_step <= total_steps and every >= 1, got start_step={start_step}, "
                f"total_steps={total_steps}, every={every}"
            )
        self.total_steps = total_steps
        self.start_step = start_step
        self.every = every
        self.print_fn = print_fn
        self.clock = clock
        self.name = name  # leads every line ("stage 2"), so that a curriculum's lines say whose they are
        self.later = later
        self._window_start: tuple[float, int] | None = None  # (time, step) where the current window began
        self._window_images = 0.0
        self._last_step = start_step  # the step of the previous update

    def update(self, step: int, scalars: Mapping[str, Any] | None = None, images_in_step: float = 0) -> str | None:
        """Count finished steps; print and return the line when ``step`` is a multiple of ``every`` or the last."""
        now = self.clock()
        if self._window_start is None:
            self._window_start = (now, step)
        else:  # the images of the steps since the previous update that are in the window (a restart cuts it)
            since = max(step - self._last_step, 1)
            self._window_images += images_in_step * min(step - self._window_start[1], since) / since
        self._last_step = step
        if step % self.every and step != self.total_steps:
            return None
        start_time, start_step = self._window_start
        line = self.format_line(step, scalars or {}, now - start_time, step - start_step, self._window_images)
        self.print_fn(line)
        self._window_start, self._window_images = (now, step), 0.0
        return line

    def restart(self, step: int) -> None:
        """After ``step``, which compiled a new program (a new batch shape): the window restarts here, so the
        compilation counts in no throughput or ETA; a line whose window holds no other step shows none."""
        self._window_start, self._window_images = (self.clock(), step), 0.0

    def format_line(
        self, step: int, scalars: Mapping[str, Any], seconds: float, steps: int, images: float
    ) -> str:
        """The line for ``step`` given the window's wall-clock ``seconds``, ``steps`` and ``images``."""
        values = {name: _to_float(name, v) for name, v in scalars.items()}
        skipped = sum(values.pop(name) for name in [n for n in values if n.startswith("skipped/")])
        parts = [self.name] * bool(self.name) + [f"step {step}/{self.total_steps}"]
        if "loss" in values:
            parts.append(f"loss {values.pop('loss'):.4f}")
        tasks = [name for name in values if name.startswith("loss/")]
        if tasks:
            parts.append(" ".join(f"{name[len('loss/'):]} {values.pop(name):.3g}" for name in tasks))
        if "lr" in values:
            parts.append(f"lr {values.pop('lr'):.1e}")
        if "grad_norm" in values:
            parts.append(f"gnorm {values.pop('grad_norm'):.3g}")
        parts += [f"{name} {v:.4g}" for name, v in values.items()]
        if skipped:
            parts.append(f"skipped {skipped:,.0f} bad records")
        if steps > 0 and seconds > 0:
            parts += [f"{_rate(images / seconds)} img/s", f"{_rate(steps / seconds)} it/s"]
            left = (self.total_steps - step) * seconds / steps
            parts.append(f"ETA {format_duration(left)}")
            if self.later is not None:
                parts.append(f"curriculum ETA ~{format_duration(left + self.later(seconds / steps))}")
        return " | ".join(parts)

