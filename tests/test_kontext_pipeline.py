"""``QueryKontextPipeline`` on a randomly initialised tiny stage-3 checkpoint (no training).

Every call samples 2 images with 2 steps at 32x32 (one t2i call at the 24x44 bucket), so calls with the same
number of input images share one compiled sampler (``sampling.generate`` is cached per shape and config).
"""

import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from qk_jax import QueryKontextPipeline, sampling

STEPS, N = 2, 2
SQUARE = {"height": 32, "width": 32}  # the tiny config's square bucket


def _image(h, w, seed):
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


@pytest.fixture(scope="module")
def checkpoint(random_stage3_checkpoint):
    return random_stage3_checkpoint


@pytest.fixture(scope="module")
def pipe(checkpoint):
    return QueryKontextPipeline.from_pretrained(checkpoint)


def _call(pipe, prompt, images=None, **kwargs):
    return pipe(prompt, images, **{"num_images": N, "num_inference_steps": STEPS, **SQUARE, **kwargs})


def _arrays(images):
    return np.stack([np.asarray(image) for image in images])


# ----------------------------------------------------------------------------------------------------------
# Every task: num_images RGB PIL images of the requested size
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("task, num_inputs", [("t2i", 0), ("edit", 1), ("custom", 1), ("multi", 2),
                                              ("subject_edit", 2), ("subject_edit", 3)])
def test_every_task_returns_num_images_pil_images(pipe, task, num_inputs):
    inputs = [Image.fromarray(_image(40, 50, k)) for k in range(num_inputs)]
    prompt = "put <image 1> at the top left" if inputs else "a red circle at the top left"
    images = _call(pipe, prompt, inputs, task=task)
    assert len(images) == N
    for image in images:
        assert isinstance(image, Image.Image) and image.mode == "RGB" and image.size == (32, 32)


def _close(a, b):
    """Equal up to a rounding step: the same image sampled in another batch (``Sampler``: float rounding)."""
    np.testing.assert_allclose(np.asarray(a, np.int32), np.asarray(b, np.int32), atol=1)


def test_size_and_prompt_list(pipe, caplog):
    # A non-square bucket is returned at its size; a list of prompts gives num_images each, prompt by prompt,
    # each from the same seeds.
    images = _call(pipe, ["a red circle", "a blue square"], height=44, width=24, num_images=1)
    assert [image.size for image in images] == [(24, 44)] * 2
    alone = _call(pipe, "a blue square", height=44, width=24, num_images=1)
    _close(images[1], alone[0])
    # Another size snaps to its nearest bucket, with a warning naming it.
    snapped = _call(pipe, "a blue square", height=45, width=23, num_images=1)
    assert "size 23x45 snaps to the nearest aspect-ratio bucket: 24x44" in caplog.text
    np.testing.assert_array_equal(np.asarray(snapped[0]), np.asarray(alone[0]))


# ----------------------------------------------------------------------------------------------------------
# A thin layer: the Sampler's images for the same requests, seeds as the Sampler's
# ----------------------------------------------------------------------------------------------------------


def test_pipeline_equals_the_sampler_and_seeds_are_deterministic(pipe, checkpoint):
    source = _image(40, 50, 1)
    kwargs = {"task": "edit", "seed": 3, "guidance_scale": 2.0, "image_guidance_scale": 1.25,
              "negative_prompt": "blurry"}
    got = _arrays(_call(pipe, "make the circle green", [Image.fromarray(source)], **kwargs))
    sampler = sampling.Sampler.from_checkpoint(checkpoint)  # an independent Sampler on the same folder
    want = sampler.sample([sampling.Request("edit", "make the circle green", (source,), num_images=N, seed=3,
                                            negative_prompt="blurry", cfg_text=2.0, cfg_image=1.25)],
                          size=(32, 32), steps=STEPS)
    np.testing.assert_array_equal(got, want)
    assert got.dtype == np.uint8 and got.shape == (N, 32, 32, 3)

    # Same seed, same images (also given as an array, and as a grey PIL image of the same RGB pixels); another
    # seed, other images; the images of a call differ from each other (seed + i).
    again = _arrays(_call(pipe, "make the circle green", [source], **kwargs))
    np.testing.assert_array_equal(again, got)
    assert not np.array_equal(got[0], got[1])
    other = _arrays(_call(pipe, "make the circle green", [source], **{**kwargs, "seed": 4}))
    assert not np.array_equal(other[0], got[0])
    _close(other[0], got[1])  # seed 4 is image 1 of seed 3

    grey = Image.fromarray(source[..., 0])
    rgb = np.asarray(grey.convert("RGB"))
    np.testing.assert_array_equal(_arrays(_call(pipe, "make the circle green", grey, **kwargs)),
                                  _arrays(_call(pipe, "make the circle green", [rgb], **kwargs)))


def test_defaults_are_the_checkpoint_config(pipe, checkpoint):
    # No steps/guidance/size: config.sample and the square bucket (t2i), as the Sampler's defaults.
    sampler = sampling.Sampler.from_checkpoint(checkpoint)
    sampler.defaults = dict(sampler.defaults, steps=STEPS)  # the tiny config's 28 steps would be slow here
    pipe_short = QueryKontextPipeline(sampler)
    got = _arrays(pipe_short("a red circle", num_images=N))
    block = pipe.config.sample
    want = sampling.Sampler.from_checkpoint(checkpoint).sample(
        [sampling.Request("t2i", "a red circle", num_images=N, negative_prompt=block.negative_prompt,
                          cfg_text=block.cfg_text, cfg_image=block.cfg_image)], size=(32, 32), steps=STEPS)
    np.testing.assert_array_equal(got, want)


# ----------------------------------------------------------------------------------------------------------
# Task inference and errors
# ----------------------------------------------------------------------------------------------------------


def test_task_inference(pipe):
    stage3_tasks = pipe.tasks
    assert set(stage3_tasks) == {"t2i", "edit", "custom", "multi", "subject_edit"}
    assert pipe.task_for(0) == "t2i"
    assert pipe.task_for(3) == "subject_edit"  # max_references=2: three images are a source and two subjects
    for n, names in [(1, "edit, custom"), (2, "multi, subject_edit")]:
        with pytest.raises(ValueError, match=f"ambiguous: they fit the tasks {names}; pass task="):
            pipe.task_for(n)
    with pytest.raises(ValueError, match="no task takes 4 input images .*config.max_references=2"):
        pipe.task_for(4)
    # Narrowed by what the checkpoint trained on: without custom one image is an edit's source.
    infer = sampling.infer_task
    assert infer(1, 2, ("t2i", "edit", "multi")) == "edit"
    assert infer(2, 2, ("t2i", "edit", "multi")) == "multi"
    assert infer(2, 1) == "subject_edit"  # one reference at most: two images cannot be two subjects
    with pytest.raises(ValueError, match="not trained on any of them .*t2i, transform.*pass task="):
        infer(1, 2, ("t2i", "recon", "transform"))  # a stage-1 checkpoint
    assert sampling.trained_tasks({"tasks": {"t2i": 0.5, "recon": 0.5, "edit": 0.0}}) == ("t2i",)
    assert sampling.trained_tasks({}) == ("t2i", "edit", "custom", "multi", "subject_edit")


def test_inferred_task_samples_as_the_explicit_one(pipe):
    inputs = [_image(32, 32, k) for k in range(3)]
    np.testing.assert_array_equal(_arrays(_call(pipe, "put <image 2> on <image 1>", inputs)),
                                  _arrays(_call(pipe, "put <image 2> on <image 1>", inputs, task="subject_edit")))
    with pytest.raises(ValueError, match="ambiguous.*edit, custom"):
        _call(pipe, "make the circle green", [inputs[0]])


@pytest.mark.parametrize("task, num_inputs, message", [
    ("t2i", 1, r"task='t2i' does not fit 1 input image\(s\): .*takes no 'reference' input"),
    ("edit", 0, r"task='edit' does not fit 0 input image\(s\): .*takes 1 'source' input, got 0"),
    ("custom", 2, r"use task 'multi'"),
    ("multi", 3, r"config.max_references=2"),
    ("paint", 0, r"unknown task 'paint'; use one of t2i, edit"),
])
def test_a_task_that_does_not_fit_the_images_is_an_error(pipe, task, num_inputs, message):
    with pytest.raises(ValueError, match=message):
        _call(pipe, "a red circle", [_image(32, 32, k) for k in range(num_inputs)], task=task)


def test_argument_errors(pipe, tmp_path):
    for kwargs, message in [({"height": 32, "width": None}, "give both or neither"),
                            ({"num_images": 0}, "num_images=0"), ({"seed": -1}, "seed -1"),
                            ({"num_inference_steps": 0}, "steps=0")]:
        with pytest.raises(ValueError, match=message):
            _call(pipe, "a red circle", **kwargs)
    with pytest.raises(ValueError, match="prompt"):
        _call(pipe, [])
    for image, error, message in [(np.zeros((8, 8, 3), np.float32), ValueError, "input image 1 is an array of shape"),
                                  ({"not": "an image"}, TypeError, "input image 1 is a dict"),
                                  (str(tmp_path / "missing.png"), ValueError, "cannot read it")]:
        with pytest.raises(error, match=message):
            _call(pipe, "make it green", [image], task="edit")


def test_from_pretrained_refuses_a_folder_that_is_not_a_model(tmp_path):
    with pytest.raises(FileNotFoundError, match="is not a qk_jax model checkpoint"):
        QueryKontextPipeline.from_pretrained(tmp_path)


def test_import_qk_jax_stays_light():
    code = ("import sys, qk_jax; assert 'jax' not in sys.modules, 'import qk_jax imported jax'; "
            "assert 'QueryKontextPipeline' in dir(qk_jax); "
            "from qk_jax import QueryKontextPipeline; assert QueryKontextPipeline.__module__ == "
            "'qk_jax.sampling.kontext_pipeline'")
    subprocess.run([sys.executable, "-c", code], check=True)
