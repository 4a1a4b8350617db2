"""The sampler and ``python -m qk_jax.sample`` on a randomly initialised tiny stage-3 checkpoint (no training).

Most tests sample 2 images with 2 steps at 32x32 so that they share compiled code (``sampling.generate`` is
compiled once per shape and model config, whichever ``Sampler`` calls it).
"""

import dataclasses
import functools
import io
import os
import subprocess
import sys

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl import app, flags
from PIL import Image

from configs import stage3
from qk_jax import sample, sampling
from qk_jax.data import pipeline, processors
from qk_jax.data.manifest import InputImage, Record
from qk_jax.models import saved_model
from qk_jax.models.query_kontext import QueryKontext, QueryKontextConfig
from qk_jax.ops import rope
from qk_jax.pytree import flatten, leaf_paths, unflatten

SIZE = (32, 32)  # the tiny config's square bucket
STEPS = 2


def _image(h, w, seed):
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def _png(image):
    out = io.BytesIO()
    Image.fromarray(image).save(out, format="PNG")
    return out.getvalue()


@pytest.fixture(scope="module")
def model_and_checkpoint(tmp_path_factory):
    config = stage3.get_config("tiny")
    model = QueryKontext(QueryKontextConfig.from_config(config))
    params = model.init(jax.random.key(0))
    directory = tmp_path_factory.mktemp("checkpoint") / "model"
    saved_model.save_model(directory, config, params, meta={"stage": 3, "step": 0})
    return config, params, directory


@pytest.fixture(scope="module")
def sampler(model_and_checkpoint):
    return sampling.Sampler.from_checkpoint(model_and_checkpoint[2])


@pytest.fixture(scope="module")
def image_files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("images")
    paths = []
    for k, (h, w) in enumerate([(40, 50), (32, 32), (30, 30)]):
        paths.append(str(folder / f"in{k}.png"))
        Image.fromarray(_image(h, w, k)).save(paths[-1])
    corrupt = folder / "corrupt.png"
    corrupt.write_bytes(_png(_image(8, 8, 9))[:40])  # a PNG header and nothing else
    return paths, str(corrupt)


# ----------------------------------------------------------------------------------------------------------
# Host side: roles, guidance weights, branches = training's guidance dropout
# ----------------------------------------------------------------------------------------------------------


def test_roles_by_task_and_guidance_weights():
    S, R = rope.SOURCE, rope.REFERENCE
    assert sampling.task_roles("t2i", 0, 2) == ()
    assert sampling.task_roles("edit", 1, 2) == (S,)
    assert sampling.task_roles("custom", 1, 2) == (R,)
    assert sampling.task_roles("multi", 2, 2) == (R, R)
    assert sampling.task_roles("subject_edit", 3, 2) == (S, R, R)
    for task, n, message in [("paint", 0, "unknown task 'paint'"), ("t2i", 1, "'t2i' takes no 'reference' input"),
                             ("edit", 0, "'edit' takes 1 'source' input, got 0"), ("edit", 2, "use task 'subject_edit'"),
                             ("custom", 2, "use task 'multi'"), ("multi", 1, "use task 'custom'"),
                             ("multi", 3, r"config.max_references=2"),
                             ("subject_edit", 1, "'subject_edit' takes 1..any 'reference' inputs, got 0"),
                             ("subject_edit", 4, r"config.max_references=2")]:
        with pytest.raises(ValueError, match=message):
            sampling.task_roles(task, n, 2)
    # Regrouped three-branch formula, and two-branch without images.
    v = np.random.default_rng(0).standard_normal((3, 5))  # v(I,T), v(I,0), v(0,0)
    s_txt, s_img = 4.0, 1.5
    want = v[2] + s_img * (v[1] - v[2]) + s_txt * (v[0] - v[1])
    np.testing.assert_allclose(np.tensordot(sampling.guidance_weights(s_txt, s_img, True), v, 1), want, rtol=1e-12)
    np.testing.assert_allclose(np.tensordot(sampling.guidance_weights(s_txt, s_img, False), v, 1),
                               v[1] + s_txt * (v[0] - v[1]), rtol=1e-12)
    assert sampling.guidance_weights(1.0, 1.0, True) == (1.0, 0.0, 0.0)


def test_branches_are_built_as_training_drops_text_and_images(sampler, model_and_checkpoint):
    config = model_and_checkpoint[0]
    source, subject = _image(32, 32, 1), _image(32, 32, 2)
    prompt = "put <image 2> on <image 1>"  # prompt order differs from slot order
    request = sampling.Request("subject_edit", prompt, (source, subject), negative_prompt="")
    prepared = sampler.prepare([request], size=SIZE, steps=STEPS)
    assert prepared.branches == sampling.BRANCHES
    record = Record(id="r", task="subject_edit", prompt=prompt, target=_png(_image(32, 32, 3)),
                    inputs=(InputImage(_png(source), "source"), InputImage(_png(subject), "reference")))
    for k, (drop_text, drop_images) in enumerate([(False, False), (True, False), (True, True)]):
        settings = pipeline.SampleSettings(
            buckets=sampler.buckets, in_context=True, max_text_tokens=int(config.vlm.max_text_tokens),
            pad_token_id=int(config.vlm.text.bos_token_id), drop_text=float(drop_text), drop_images=float(drop_images))
        trained = pipeline.MakeSample(settings, sampler.processor)(record, np.random.default_rng(0))
        assert bool(trained["text_dropped"]) == drop_text and bool(trained["images_dropped"]) == drop_images
        for key in ("input_ids", "attention_mask", "pixel_values", "image_present", "roles"):
            np.testing.assert_array_equal(prepared.batch[key][k], trained[key], err_msg=f"{sampling.BRANCHES[k]} {key}")
        if not drop_images:  # the VAE's inputs (the (0, 0) branch keeps them too: its slots are NONE)
            np.testing.assert_array_equal(prepared.batch["inputs"][0], trained["inputs"] / np.float32(127.5) - 1)


def test_processor_for_follows_the_config_tokenizer():
    """Sampling tokenises as training did: the stand-in ``config.vlm.tokenizer`` names (no tokenizer folder)."""
    assert type(processors.processor_for(stage3.get_config("tiny"))) is processors.ByteProcessor
    shapes_config = stage3.get_config("shapes")
    processor = processors.processor_for(shapes_config)
    assert type(processor) is processors.WordProcessor
    assert processor.vocabulary == tuple(shapes_config.vlm.vocabulary)


# ----------------------------------------------------------------------------------------------------------
# The compiled sampler against the formulas
# ----------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def reference(sampler):
    """The model's pieces, jitted one by one: the reference the batched sampler is checked against."""
    model = QueryKontext(sampler.model_config)
    return dict(condition=jax.jit(model.condition, static_argnums=4), encode=jax.jit(model.encode),
                velocity=jax.jit(model.velocity, static_argnums=4))


def _reference_latents(reference, sampler, prepared, request):
    """Euler with guidance built from separate model calls, one per branch and image (batch 1)."""
    params, b = sampler.params, prepared.batch
    row = lambda key, k: b[key][k:k + 1]
    cond = {name: reference["condition"](params, row("input_ids", k), row("attention_mask", k), row("pixel_values", k),
                                         prepared.image_grid, row("image_present", k))
            for k, name in enumerate(prepared.branches)}
    roles = {name: row("roles", k) for k, name in enumerate(prepared.branches)}
    in_context = reference["encode"](params, b["inputs"][0])[None]  # [1, M, T, 4C]
    sigmas = b["sigmas"]
    tokens = (prepared.latent_hw[0] * prepared.latent_hw[1], sampler.model_config.mmdit.in_channels)
    out, spread = [], []
    for i in range(request.num_images):
        x = jax.random.normal(jax.random.key(request.seed + i), tokens, jnp.float32)[None]
        for j in range(prepared.steps):
            t = jnp.full((1,), sigmas[j])
            v = {name: reference["velocity"](params, cond[name], x, t, prepared.latent_hw, in_context, roles[name])
                 for name in prepared.branches}
            if len(v) == 1:
                guided = v["image_text"]
            else:
                guided = v["none"] + request.cfg_image * (v["image"] - v["none"]) + request.cfg_text * (
                    v["image_text"] - v["image"])
                spread.append((float(jnp.abs(v["image_text"] - v["image"]).max()),
                               float(jnp.abs(v["image"] - v["none"]).max())))
            x = x + (sigmas[j + 1] - sigmas[j]) * guided
        out.append(x[0])
    return jnp.stack(out), spread


def test_three_branch_guidance_is_one_batched_forward_of_the_formula(sampler, reference):
    request = sampling.Request("edit", "make it green", (_image(40, 50, 0),), num_images=2, seed=5,
                             cfg_text=4.0, cfg_image=1.5)
    prepared = sampler.prepare([request], size=SIZE, steps=STEPS)
    assert prepared.branches == sampling.BRANCHES and prepared.batch["input_ids"].shape[0] == 3
    latents, images = sampler.run(prepared)
    want, spread = _reference_latents(reference, sampler, prepared, request)
    chex.assert_trees_all_close(latents, want, atol=2e-5)
    assert min(min(s) for s in spread) > 1e-3  # the branches differ: guidance is not vacuous here
    assert images.shape == (2, 32, 32, 3) and images.dtype == np.uint8


def test_no_guidance_is_the_conditional_prediction_and_one_euler_step(sampler, reference):
    request = sampling.Request("edit", "make it green", (_image(40, 50, 0),), num_images=2, seed=5,
                             cfg_text=1.0, cfg_image=1.0)
    prepared = sampler.prepare([request], size=SIZE, steps=1)
    assert prepared.branches == ("image_text",)  # zero-weight branches are not computed
    latents, _ = sampler.run(prepared)
    want, _ = _reference_latents(reference, sampler, prepared, request)  # x + (sigma_next - sigma) v(I, T)
    chex.assert_trees_all_close(latents, want, atol=2e-5)


def test_seeds_and_compile_once_per_shape_with_the_vlm_outside_the_loop(sampler, monkeypatch):
    calls = {"condition": 0, "velocity": 0}
    for name in calls:
        original = getattr(QueryKontext, name)

        def counted(self, *args, _name=name, _original=original, **kwargs):
            calls[_name] += 1  # a Python side effect: runs while tracing only
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(QueryKontext, name, counted)
    request = sampling.Request("t2i", "a red circle", num_images=2, seed=0)
    prepared = sampler.prepare([request], size=SIZE, steps=STEPS)
    first = sampler.sample([request], size=SIZE, steps=STEPS)  # compiles this shape unless a test did before
    calls.update(condition=0, velocity=0)
    again = sampler.sample([request], size=SIZE, steps=STEPS)
    shifted, other = sampler.run(sampler.prepare([dataclasses.replace(request, seed=1)], size=SIZE, steps=STEPS))
    assert calls == {"condition": 0, "velocity": 0}  # same shapes (a new seed is data): no retrace
    np.testing.assert_array_equal(first, again)
    assert np.abs(first.astype(int) - other.astype(int)).max() > 10
    latents, _ = sampler.run(prepared)
    chex.assert_trees_all_close(shifted[:1], latents[1:], atol=1e-5)  # image i of seed s has the noise of s + i

    # One trace runs the VLM once and the MMDiT once (the loop body); in the program the VLM's parameters are
    # not operands of the step loop, the MMDiT's are.
    jaxpr = jax.make_jaxpr(functools.partial(
        sampling.generate.__wrapped__, config=sampler.model_config, image_grid=prepared.image_grid,
        latent_hw=prepared.latent_hw))(sampler.params, prepared.batch).jaxpr
    assert calls == {"condition": 1, "velocity": 1}
    by_var = dict(zip(jaxpr.invars, leaf_paths((sampler.params, prepared.batch))))
    (loop,) = [e for e in jaxpr.eqns if e.primitive.name in ("scan", "while")]
    operands = {by_var.get(v) for v in loop.invars if not isinstance(v, jax.extend.core.Literal)}
    assert any(p and p.startswith("0/mmdit/") for p in operands)
    assert not any(p and p.startswith("0/vlm/") for p in operands)


# ----------------------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------------------


def _flags(checkpoint, out, task, images, *extra):
    return ["--checkpoint", str(checkpoint), "--task", task, "--prompt", "a red circle", "--num-images", "2",
            "--steps", str(STEPS), "--size", "32x32", "--out", str(out),
            *[a for path in images for a in ("--image", path)], *extra]


@pytest.mark.parametrize("task,count", [("t2i", 0), ("edit", 1), ("custom", 1), ("multi", 2), ("subject_edit", 2)])
def test_cli_writes_the_images_and_a_grid_for_every_task(task, count, model_and_checkpoint, image_files, tmp_path,
                                                         capsys):
    out = tmp_path / "out.png"
    paths = sample.main(_flags(model_and_checkpoint[2], out, task, image_files[0][:count]))
    assert paths == [str(tmp_path / "out_0.png"), str(tmp_path / "out_1.png"), str(out)]
    for path in paths[:2]:
        assert Image.open(path).size == SIZE and Image.open(path).mode == "RGB"
    assert Image.open(out).size == (64, 32)  # 2 images side by side
    printed = capsys.readouterr().out
    assert f"step {STEPS}/{STEPS}" in printed and "size 32x32" in printed
    branches = "image_text, image" if task == "t2i" else "image_text, image, none"
    assert f"guidance branches {branches} " in printed
    weights = "[4.0, -3.0]" if task == "t2i" else "[4.0, -2.5, -0.5]"  # from config.sample's scales 4.0, 1.5
    assert f"(weights {weights})" in printed


def test_cli_samples_in_batches_with_the_same_seeds(model_and_checkpoint, tmp_path, capsys):
    """``--batch 2`` for 3 images: two calls; image 2 (seed + 2, alone in its call) is the image that
    ``--seed seed+2 --num-images 1`` gives, bit for bit."""
    checkpoint = model_and_checkpoint[2]
    base = ["--checkpoint", str(checkpoint), "--prompt", "a red circle", "--steps", str(STEPS), "--size", "32x32"]
    batched = sample.main(base + ["--num-images", "3", "--batch", "2", "--seed", "5", "--out", str(tmp_path / "a.png")])
    assert len(batched) == 4 and "3 images (2 call(s) of up to 2)" in capsys.readouterr().out
    alone = sample.main(base + ["--num-images", "1", "--seed", "7", "--out", str(tmp_path / "b.png")])
    np.testing.assert_array_equal(np.asarray(Image.open(batched[2])), np.asarray(Image.open(alone[0])))


def test_cli_infers_the_task_when_the_images_allow_one(model_and_checkpoint, image_files, tmp_path, capsys):
    # No --task: no image is t2i (said in the output); one image is an edit's source or a subject's reference on
    # a stage-3 checkpoint, so the error names both and asks for --task.
    checkpoint, (a, _, _) = model_and_checkpoint[2], image_files[0]
    base = ["--checkpoint", str(checkpoint), "--prompt", "a red circle", "--num-images", "1", "--steps", str(STEPS),
            "--size", "32x32", "--out", str(tmp_path / "t.png")]
    assert len(sample.main(base)) == 2
    assert "task t2i (from 0 input image(s); --task to choose)" in capsys.readouterr().out
    with pytest.raises(app.UsageError, match=r"ambiguous: they fit the tasks edit, custom; pass task="):
        sample.main(base + ["--image", a])


def test_python_dash_m_snaps_the_size_to_a_bucket(model_and_checkpoint, tmp_path):
    out = tmp_path / "grid.png"
    result = subprocess.run(
        [sys.executable, "-m", "qk_jax.sample", "--checkpoint", str(model_and_checkpoint[2]),
         "--prompt", "a blue square", "--size", "40x30", "--num-images", "1", "--steps", "1", "--seed", "3",
         "--out", str(out)],
        capture_output=True, text=True, env=dict(os.environ, JAX_PLATFORMS="cpu"),
        cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))), timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "size 40x30 snaps to the nearest aspect-ratio bucket: 36x28" in result.stdout
    assert "step 1/1" in result.stdout
    assert Image.open(tmp_path / "grid_0.png").size == (36, 28) and Image.open(out).size == (36, 28)


def test_cli_errors_name_the_problem(model_and_checkpoint, image_files, tmp_path):
    config, params, checkpoint = model_and_checkpoint
    (a, b, c), corrupt = image_files
    out = tmp_path / "x.png"
    with pytest.raises(flags.IllegalFlagValueError, match="t2i"):
        sample.main(_flags(checkpoint, out, "paint", []))
    with pytest.raises(flags.IllegalFlagValueError, match="prompt"):
        sample.main(["--checkpoint", str(checkpoint), "--out", str(out)])
    for images, message in [([str(tmp_path / "nope.png")], "nope.png: cannot read it"),
                            ([corrupt], "corrupt.png is not a readable image")]:
        with pytest.raises(app.UsageError, match=message):
            sample.main(_flags(checkpoint, out, "edit", images))
    with pytest.raises(app.UsageError, match="WIDTHxHEIGHT"):
        sample.main(_flags(checkpoint, out, "t2i", [], "--size", "big"))
    for task, images, message in [("multi", [a, b, c], "config.max_references=2"),
                                  ("t2i", [a], "'t2i' takes no 'reference' input"),
                                  ("edit", [], "'edit' takes 1 'source' input, got 0")]:
        with pytest.raises(app.UsageError, match=message):
            sample.main(_flags(checkpoint, out, task, images))
    with pytest.raises(app.UsageError, match="not a qk_jax model checkpoint"):
        sample.main(_flags(tmp_path, out, "t2i", []))
    assert not list(tmp_path.glob("x*.png"))

    # Params from another model config: the differing leaves are named.
    flat = dict(flatten(params))
    flat["mmdit/proj_out/kernel"] = np.zeros((3, 5), np.float32)
    del flat["connector/linear_1/bias"]
    saved_model.save_model(tmp_path / "other", config, unflatten(flat))
    with pytest.raises(saved_model.CheckpointMismatchError,
                       match=r"mmdit/proj_out/kernel: shape \(3, 5\) in the checkpoint, \(32, 16\) from the config; "
                             r"connector/linear_1/bias: missing"):
        sampling.Sampler.from_checkpoint(tmp_path / "other")
    with pytest.raises(app.UsageError, match="another model config"):
        sample.main(_flags(tmp_path / "other", out, "t2i", []))


def test_library_errors(sampler):
    edit = sampling.Request("edit", "x", (_image(32, 32, 0),))
    with pytest.raises(ValueError, match="same number of input images"):
        sampler.prepare([edit, sampling.Request("t2i", "x")], size=SIZE)
    with pytest.raises(ValueError, match="different buckets"):
        sampler.prepare([edit, sampling.Request("edit", "x", (_image(20, 60, 0),))])
    with pytest.raises(ValueError, match="vlm.max_text_tokens"):
        sampler.prepare([sampling.Request("t2i", "x" * 1000)], size=SIZE)
    with pytest.raises(ValueError, match="HxWx3 uint8"):
        sampler.prepare([sampling.Request("edit", "x", (np.zeros((8, 8), np.uint8),))])
    with pytest.raises(ValueError, match="at least one step"):
        sampler.prepare([edit], steps=0)


def test_reconstruct_is_the_vae_round_trip_through_the_mmdit_latent_layout(sampler):
    """``reconstruct`` packs and normalises the posterior mean as the MMDiT sees it, then decodes as ``generate``
    does; the scaling and packing must cancel: the result is the VAE's own encode-mean-decode, rounded."""
    images = np.stack([_image(32, 32, 20), _image(32, 32, 21)])
    got = np.asarray(sampling.reconstruct(sampler.params, images, config=sampler.model_config))
    vae = QueryKontext(sampler.model_config).vae
    x = images.astype(np.float32) / 127.5 - 1.0
    expected = vae.apply({"params": sampler.params["vae"]}, x)  # decode(encode(x).mean)
    expected = np.clip(np.round((np.asarray(expected, np.float64) + 1.0) * 127.5), 0, 255)
    assert got.dtype == np.uint8 and got.shape == images.shape
    np.testing.assert_allclose(got.astype(np.float64), expected, atol=1)  # float32 rounding at .5 boundaries
    assert np.mean(got == expected) > 0.99


def test_an_input_image_over_the_training_pixel_cap_is_refused_before_decoding(model_and_checkpoint, tmp_path):
    """``sample --image`` and the pipeline read through the training cap (``data.max_image_pixels``, else
    ``images.max_pixels_for(resolution)``): a 2049 x 2049 PNG (1.5 KB of zeros) at the tiny 32 px resolution is a
    one-line usage error naming the limit, from its header alone; one under the cap is read."""
    from qk_jax.data import images as images_lib
    from qk_jax.sampling import kontext_pipeline

    config, _, checkpoint = model_and_checkpoint
    cap = images_lib.max_pixels_for(config.data.resolution)
    assert cap == 2048**2 and sampling.Sampler.from_checkpoint(checkpoint).max_image_pixels == cap
    big, fine = tmp_path / "big.png", tmp_path / "fine.png"
    Image.new("RGB", (2049, 2049)).save(big)
    Image.new("RGB", (2048, 2048)).save(fine)
    with pytest.raises(app.UsageError, match=r"big.png is not a readable image \(too_large: .*2049x2049 pixels is "
                                             r"over the 4,194,304-pixel limit"):
        sample.main(_flags(checkpoint, tmp_path / "x.png", "edit", [str(big)]))
    with pytest.raises(ValueError, match="too_large"):
        kontext_pipeline.QueryKontextPipeline.from_pretrained(checkpoint)("edit", [str(big)], task="edit")
    assert sampling.read_image(fine, cap).shape == (2048, 2048, 3) and sampling.read_image(big).shape[0] == 2049
