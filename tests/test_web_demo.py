"""The web demo (``qk_jax.sampling.web_demo``, ``python -m qk_jax.demo``) on a random tiny stage-3 checkpoint,
served on localhost and driven through ``gradio_client``, as the page's Generate button calls it.

Skipped without the ``demo`` extra (gradio). Every task samples 2 images with 2 steps at the tiny config's 32x32
bucket from the page's own ShapesWorld example, and must give exactly what the pipeline gives for the same
arguments (so the page passes every value through). The ``slow`` test loads the page in headless Chromium and
saves a screenshot (also to ``$QK_DEMO_SCREENSHOT`` when set).
"""

import os
import shutil
import socket
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

gr = pytest.importorskip("gradio")
gradio_client = pytest.importorskip("gradio_client")

from absl import app  # noqa: E402

from qk_jax import QueryKontextPipeline  # noqa: E402
from qk_jax import demo as demo_cli  # noqa: E402
from qk_jax.data import tasks as tasks_lib  # noqa: E402
from qk_jax.sampling import web_demo  # noqa: E402

# gradio's queue calls pandas APIs that pandas 3 deprecates: theirs to move off, not ours.
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning:gradio.queueing")

STEPS, N = 2, 2
CHROMIUM = "/usr/bin/chromium"
# Not the checkpoint's config.sample values (4.0, 1.5, seed 0), so a value the page dropped would show.
SETTINGS = dict(negative_prompt="", cfg_text=3.0, cfg_image=2.0, seed=5, steps=STEPS, num_images=N, size=web_demo.AUTO)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def pipe(random_stage3_checkpoint):
    return QueryKontextPipeline.from_pretrained(random_stage3_checkpoint)


@pytest.fixture(scope="module")
def served(pipe):
    """``(page, url)``: the demo served on localhost for the module."""
    page = web_demo.build_demo(pipe, checkpoint="a random tiny stage-3 model")
    url = web_demo.serve(page, host="127.0.0.1", port=_free_port(), block=False)
    yield page, url
    page.close()


@pytest.fixture(scope="module")
def client(served):
    return gradio_client.Client(served[1], verbose=False)


@pytest.fixture(scope="module")
def examples(pipe):
    return {item["task"]: item for item in web_demo.example_items(pipe.config)}


def _predict(client, pipe, task, prompt, paths=(), **settings):
    """``/generate`` with ``SETTINGS`` (``settings`` override), images ``paths`` in the first slots:
    ``(PIL images, status)``."""
    values = dict(SETTINGS, task=task, prompt=prompt, **settings)
    slots = [gradio_client.handle_file(str(p)) for p in paths]
    slots += [None] * (int(pipe.config["max_references"]) + 1 - len(slots))
    gallery, status = client.predict(*[values[name] for name in web_demo.GENERATE_INPUTS], *slots,
                                     api_name=f"/{web_demo.API_NAME}")
    return [Image.open(entry["image"]) for entry in gallery], status


def _written(item, directory):
    """The example's input images as PNG files, as a user would upload them."""
    paths = []
    for k, inp in enumerate(item["inputs"]):
        paths.append(directory / f"{item['task']}_{k}.png")
        Image.fromarray(inp["image"]).save(paths[-1])
    return paths


# ----------------------------------------------------------------------------------------------------------
# Every task through the client: the pipeline's images for the same arguments
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("task", tasks_lib.SAMPLING_TASKS)
def test_every_task_gives_the_pipelines_images(client, pipe, examples, task, tmp_path):
    item = examples[task]
    images, status = _predict(client, pipe, task, item["prompt"], _written(item, tmp_path))
    assert len(images) == N
    for image in images:
        assert image.format == "PNG" and image.mode == "RGB" and image.size == (32, 32)
    expected = pipe(item["prompt"], [inp["image"] for inp in item["inputs"]], task=task, num_images=N,
                    seed=SETTINGS["seed"], num_inference_steps=STEPS, guidance_scale=SETTINGS["cfg_text"],
                    image_guidance_scale=SETTINGS["cfg_image"], negative_prompt="")
    for got, want in zip(images, expected):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    assert status.startswith(f"task {task} · 32x32 · {N} image(s), seeds 5..6 · {STEPS} steps")


def test_auto_task_size_and_count(client, pipe):
    # No image: auto is t2i; a size picks its bucket; one image from seed 0 is image 0 of a seed-0 batch.
    images, status = _predict(client, pipe, web_demo.AUTO, "a red circle", size="24x44", num_images=1, seed=0)
    assert [image.size for image in images] == [(24, 44)]
    assert status.startswith("task t2i (auto, from 0 image(s)) · 24x44 · 1 image(s), seeds 0..0")


# ----------------------------------------------------------------------------------------------------------
# Errors come back as messages
# ----------------------------------------------------------------------------------------------------------


def _error(client, pipe, *args, **settings) -> str:
    with pytest.raises(gradio_client.exceptions.AppError) as caught:
        _predict(client, pipe, *args, **settings)
    return str(caught.value)


def test_bad_combinations_are_error_messages(client, pipe, examples, tmp_path):
    assert "task='edit' does not fit 0 input image(s)" in _error(client, pipe, "edit", "make it green")
    paths = _written(examples["edit"], tmp_path)
    assert "ambiguous: they fit the tasks edit, custom" in _error(client, pipe, web_demo.AUTO, "make it green", paths)
    assert "seed 4294967296: seeds" in _error(client, pipe, "edit", "make it green", paths, seed=2**32)
    # An image in slot 2 with slot 1 empty: not silently moved up (slot 1 is the source).
    values = dict(SETTINGS, task="custom", prompt="the subject", num_images=1)
    with pytest.raises(gradio_client.exceptions.AppError, match=r"image slot\(s\) \[1\] are empty"):
        client.predict(*[values[name] for name in web_demo.GENERATE_INPUTS], None,
                       gradio_client.handle_file(str(paths[0])), None, api_name=f"/{web_demo.API_NAME}")


# ----------------------------------------------------------------------------------------------------------
# The page's controls and examples
# ----------------------------------------------------------------------------------------------------------


def test_examples_one_per_trained_task_at_the_checkpoint_size(pipe, served):
    items = web_demo.example_items(pipe.config)
    assert [item["task"] for item in items] == [t for t in tasks_lib.SAMPLING_TASKS if t in pipe.tasks]
    for item in items:
        assert pipe.task_for(len(item["inputs"]), item["task"]) == item["task"]
        assert all(inp["image"].shape == (32, 32, 3) for inp in item["inputs"]) and item["prompt"]
    # A checkpoint trained on a manifest, without a ShapesWorld block (paper scale): ShapesWorld's default world at
    # its resolution, the manifest left unread (it need not be where the demo runs).
    config = pipe.config.copy_and_resolve_references()
    del config.data["world"]
    config.data.manifest = "/nonexistent/manifest.jsonl"
    assert [(i["task"], i["prompt"]) for i in web_demo.example_items(config)] == [(i["task"], i["prompt"])
                                                                                 for i in items]
    page, _ = served
    [dataset] = [block for block in page.blocks.values() if isinstance(block, gr.Dataset)]
    assert len(dataset.samples) == len(items)
    radio = next(block for block in page.blocks.values() if isinstance(block, gr.Radio))
    assert [value for _, value in radio.choices] == [web_demo.AUTO, *pipe.tasks]
    slider_values = sorted(block.value for block in page.blocks.values() if isinstance(block, gr.Slider))
    assert slider_values == sorted([1, 1.5, 4.0, 28])  # images, then config.sample's cfg_image, cfg_text, steps


def test_the_command_names_the_extra_and_checks_the_checkpoint(monkeypatch, tmp_path):
    with pytest.raises(app.UsageError, match="is not a qk_jax model checkpoint"):
        demo_cli.main(["--checkpoint", str(tmp_path)])
    monkeypatch.setitem(sys.modules, "gradio", None)  # import gradio now raises ImportError
    with pytest.raises(app.UsageError, match=r"pip install 'qk_jax\[demo\]'"):
        demo_cli.main(["--checkpoint", str(tmp_path)])


# ----------------------------------------------------------------------------------------------------------
# The page in a browser
# ----------------------------------------------------------------------------------------------------------


def _pixels_near(shot: np.ndarray, colour, tolerance: int) -> int:
    return int((np.abs(shot.astype(np.int32) - np.asarray(colour)).max(-1) <= tolerance).sum())


@pytest.mark.slow
@pytest.mark.skipif(not os.path.exists(CHROMIUM), reason=f"no {CHROMIUM} (apt-get install chromium)")
def test_the_page_renders_in_headless_chromium(served, pipe, tmp_path):
    _, url = served
    path = tmp_path / "demo.png"
    command = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
               "--disable-background-networking", "--disable-component-update", "--disable-sync",
               f"--user-data-dir={tmp_path / 'profile'}", "--window-size=1280,1800", "--virtual-time-budget=15000",
               f"--screenshot={path}", url]
    out = subprocess.run(command, capture_output=True, text=True, timeout=180)
    assert path.exists(), (out.returncode, out.stderr[-3000:])
    if os.environ.get("QK_DEMO_SCREENSHOT"):
        shutil.copyfile(path, os.environ["QK_DEMO_SCREENSHOT"])
    shot = np.asarray(Image.open(path).convert("RGB"))
    assert shot.shape == (1800, 1280, 3) and len(np.unique(shot.reshape(-1, 3), axis=0)) > 1
    # The app rendered, not Chromium's error page or gradio's loading screen (both have many colours too): the
    # Generate button and the sliders in gradio's default primary orange, and the examples' ShapesWorld colours.
    assert _pixels_near(shot, (249, 115, 22), 30) > 10_000
    palette = dict(pipe.config["data"]["world"]["colors"]).values()
    assert sum(_pixels_near(shot, rgb, 10) for rgb in palette) > 200
