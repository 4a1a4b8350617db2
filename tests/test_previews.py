"""Samples while training (``qk_jax.training.previews``) and the profiler window: a tiny stage writes its preview PNG
and TensorBoard images at the steps ``config.preview.every`` names, from ShapesWorld's held-out split or from a
manifest, and ``config.profile_steps`` leaves a jax.profiler trace."""

import glob
import io
import json
import os
import sys
import types

import numpy as np
import pytest
from PIL import Image

from configs import stage1
from qk_jax.training import loop, metrics, previews


def _tb_images(workdir):
    """``{step: (height, width, png bytes)}`` of the ``samples`` image summaries in the run's TensorBoard events."""
    from tensorboard.backend.event_processing import event_accumulator

    acc = event_accumulator.EventAccumulator(str(workdir / metrics.TB_DIR),
                                             size_guidance={event_accumulator.IMAGES: 0})
    acc.Reload()
    return {e.step: (e.height, e.width, e.encoded_image_string) for e in acc.Images("samples")}


class FakeWandb(types.ModuleType):
    """What the stage asks of ``wandb``, recorded: ``init``'s arguments, then ``(step, {name: value})`` per
    ``log`` (``Image`` objects keep their PIL image), and whether the run was finished."""

    class Image:
        def __init__(self, image):
            self.image = image

    def __init__(self):
        super().__init__("wandb")
        self.util = types.SimpleNamespace(generate_id=lambda: "run-id-1")
        self.inits, self.logged, self.finished = [], [], 0

    def init(self, **kwargs):
        self.inits.append(kwargs)
        fake = self

        class Run:
            def log(self, values, step):
                fake.logged.append((step, values))

            def finish(self):
                fake.finished += 1

        return Run()


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("previews") / "run"
    config = stage1.get_config("tiny")
    config.total_steps, config.checkpoint_every = 3, 100
    config.preview.every = 2
    config.profile_steps = (2, 5)  # steps 2-6 of a 3-step run: the window ends with the run
    config.wandb.update(enabled=True, project="qk-test", mode="offline")
    fake = FakeWandb()
    with pytest.MonkeyPatch.context() as patch:
        patch.setitem(sys.modules, "wandb", fake)
        loop.train_stage(config, str(workdir))
    return config, workdir, fake


def test_a_stage_writes_its_previews_at_every_and_at_the_end(run):
    config, workdir, _ = run
    written = sorted(os.listdir(workdir / previews.SAMPLES_DIR))
    assert written == ["step_0000002.png", "step_0000003.png"]  # every 2 steps, and the last
    grid = np.asarray(Image.open(workdir / previews.SAMPLES_DIR / written[-1]))
    assert grid.shape[0] >= 128 and grid.std() > 0  # stage 1's one sampled task (t2i): a picture, not blank
    images = _tb_images(workdir)
    assert sorted(images) == [2, 3]
    height, width, png = images[3]
    assert (height, width) == grid.shape[:2]
    np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(png))), grid)


def test_weights_and_biases_gets_the_scalars_and_the_previews(run):
    # One run per stage, named after the workdir, with the whole config and an id kept for a resume; every log
    # step's scalars (log_every=1: steps 1-3) and the preview PNGs at steps 2 and 3, then finished.
    config, workdir, fake = run
    (init,) = fake.inits
    assert init["project"] == "qk-test" and init["mode"] == "offline" and init["resume"] == "allow"
    assert init["id"] == "run-id-1" == (workdir / metrics.WANDB_RUN_ID).read_text().strip()
    assert init["name"] == f"{workdir.parent.name}/run" and init["config"]["total_steps"] == 3
    scalars = {step: values for step, values in fake.logged if "loss" in values}
    assert sorted(scalars) == [1, 2, 3] and all(np.isfinite(v["loss"]) for v in scalars.values())
    jsonl = {step: row["loss"] for step, row in metrics.read_jsonl(workdir / metrics.JSONL).items() if "loss" in row}
    assert {step: values["loss"] for step, values in scalars.items()} == pytest.approx(jsonl)
    images = {step: values["samples"].image for step, values in fake.logged if "samples" in values}
    assert sorted(images) == [2, 3]
    grid = np.asarray(Image.open(workdir / previews.SAMPLES_DIR / "step_0000003.png"))
    np.testing.assert_array_equal(np.asarray(images[3]), grid)
    assert fake.finished == 1


def test_weights_and_biases_missing_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # import wandb raises ImportError
    with pytest.raises(ImportError, match="pip install wandb"):
        metrics.MetricsWriter(tmp_path, tensorboard=False, wandb=dict(enabled=True))


def test_the_profiler_traces_the_steps_asked_even_past_the_last(run):
    """A window that runs past the last step is traced up to it (the trace was never stopped, so never written)."""
    _, workdir, _ = run
    assert glob.glob(str(workdir / "profile" / "**" / "*.xplane.pb"), recursive=True)


def test_preview_inputs_are_shapesworlds_held_out_split_or_a_manifests_first_per_task(tmp_path):
    config = stage1.get_config("tiny")
    config.tasks = dict(t2i=0.5, recon=0.2, edit=0.3)  # recon: no sampling path, no preview
    items = previews.preview_items(config)
    assert [item["task"] for item in items] == ["t2i", "edit"]
    assert all(item["target"].shape == (32, 32, 3) for item in items) and len(items[1]["inputs"]) == 1
    again = previews.preview_items(config)  # fixed: every preview of a run shows the same inputs
    assert [a["prompt"] for a in items] == [b["prompt"] for b in again]
    np.testing.assert_array_equal(items[0]["target"], again[0]["target"])

    pixels = np.random.default_rng(0).integers(0, 256, (40, 24, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(tmp_path / "a.png")
    (tmp_path / "bad.png").write_bytes(b"not an image")
    lines = [dict(task="edit", prompt="make <image 1> blue", target="a.png", inputs=[dict(path="a.png", role="source")]),
             dict(task="t2i", prompt="the bad one", target="bad.png"), dict(task="t2i", prompt="a", target="a.png"),
             dict(task="t2i", prompt="b", target="a.png")]
    (tmp_path / "m.jsonl").write_text("\n".join(json.dumps(line) for line in lines) + "\n")
    config.preview.manifest = str(tmp_path / "m.jsonl")
    items = previews.preview_items(config)
    assert [(item["task"], item["prompt"]) for item in items] == [("t2i", "a"), ("edit", "make <image 1> blue")]
    np.testing.assert_array_equal(items[1]["inputs"][0]["image"], pixels)
    outputs = [np.zeros((32, 32, 3), np.uint8)] * 2  # any size of input or target fits the grid's cells
    assert previews.preview_grid(items, outputs).size[1] > 2 * 32
