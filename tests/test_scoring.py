"""The evaluator: scoring on ground truth and corrupted images, and the CLI on a random tiny stage-3 checkpoint."""

import json
import os

import jax
import numpy as np
import pytest
from absl import app

from configs import stage3
from qk_jax import evaluate, sampling
from qk_jax.data import shapesworld
from qk_jax.evaluation import scoring
from qk_jax.models import saved_model
from qk_jax.models.query_kontext import QueryKontext, QueryKontextConfig

WORLD = shapesworld.default_world(64)
NUM = 12


def _samples(task):
    return [shapesworld.generate_sample(WORLD, [0, k], task, "test") for k in range(NUM)]


@pytest.mark.parametrize("task", scoring.TASKS)
def test_ground_truth_scores_perfectly(task):
    scores = [scoring.score_sample(item, item["target"], WORLD)["scores"] for item in _samples(task)]
    metrics = scoring.summarize(task, scores)
    for cat in scoring.CATEGORIES[task]:
        assert metrics[cat] in (1.0, None), (cat, metrics)
    assert metrics[scoring.CATEGORIES[task][-1]] == 1.0
    if task in scoring.PRESERVATION_TASKS:
        assert metrics["preservation"] == 0.0
    if task == "t2i":
        assert metrics["single_object"] is not None or metrics["two_objects"] is not None


def _plain(color, shape, cell, size="large"):
    return dict(shape=shape, color=color, size=size, cell=cell)


def test_t2i_corruptions():
    target = [_plain("red", "circle", [0, 0]), _plain("blue", "square", [1, 1])]
    recolored = [_plain("green", "circle", [0, 0]), target[1]]
    moved = [_plain("red", "circle", [2, 2]), target[1]]
    swapped = [_plain("red", "square", [0, 0]), _plain("blue", "circle", [1, 1])]  # colours bound to wrong shapes
    parse = lambda scene: shapesworld.parse_scene(shapesworld.render(scene, WORLD), WORLD)  # noqa: E731
    s = scoring.score_t2i(parse(recolored), target)
    assert not s["colors"] and not s["attribute_binding"] and not s["overall"] and not s["two_objects"]
    assert s["position"] and s["counting"] and s["single_object"] is None
    s = scoring.score_t2i(parse(moved), target)
    assert not s["position"] and not s["overall"] and not s["attribute_binding"]
    assert s["counting"] and s["two_objects"]  # both objects are drawn, one in the wrong place
    s = scoring.score_t2i(parse(swapped), target)
    assert s["colors"] and s["position"] and not s["attribute_binding"] and not s["two_objects"]
    s = scoring.score_t2i(parse(target[:1]), target)
    assert not s["counting"] and not s["position"] and not s["overall"]


def test_t2i_breakdown_counts_by_prompt_size_and_per_object():
    one = [_plain("red", "circle", [0, 0])]
    two = [_plain("red", "circle", [0, 0]), _plain("blue", "square", [1, 1], size="small")]
    samples = [  # (target, prediction): one right; two with a recoloured object; two with a moved one plus an extra
        (one, one),
        (two, [two[0], _plain("green", "square", [1, 1], size="small")]),
        (two, [two[0], _plain("blue", "square", [2, 2], size="small"), _plain("red", "triangle", [0, 2])]),
    ]
    samples = [dict(target_scene=t, pred_scene=p, scores=scoring.score_t2i(p, t)) for t, p in samples]
    out = scoring.t2i_breakdown(samples)
    assert {n: g["num"] for n, g in out["by_objects"].items()} == {"1": 1, "2": 2}
    assert out["by_objects"]["1"]["metrics"]["colors"] == 1.0 and out["by_objects"]["1"]["metrics"]["overall"] == 1.0
    two_objects = out["by_objects"]["2"]["metrics"]
    assert two_objects["colors"] == 0.0 and two_objects["position"] == 0.5 and two_objects["overall"] == 0.0
    assert two_objects["single_object"] is None
    # Five asked objects: four placed (the moved square is not in its cell), three of them in the asked colour.
    assert out["per_object"] == dict(placed=0.8, color=0.6, shape=0.8, size=0.8, look=0.6, objects=5, extra=2 / 3)
    md = "\n".join(scoring._breakdown_markdown(out))
    assert "| colors | 100.0% | 0.0% |" in md and "| 80.0% | 60.0% | 80.0% | 80.0% | 60.0% | 0.67 |" in md


def test_edit_preservation_counts_only_unedited_cells():
    item = next(it for it in _samples("edit") if len(it["inputs"][0]["scene"]) >= 2)
    source = item["inputs"][0]["image"]
    edited = scoring.changed_cells(item["target"], source)
    assert edited and len(edited) == 1
    free = next([r, c] for r in range(3) for c in range(3) if [r, c] not in edited)
    rng = np.random.default_rng(0)
    noise_edited = item["target"].copy()
    noise_unedited = item["target"].copy()
    for image, cell in [(noise_edited, edited[0]), (noise_unedited, free)]:
        mask = scoring.cell_mask([cell], image.shape[:2])
        image[mask] = rng.integers(0, 256, (int(mask.sum()), 3), dtype=np.uint8)
    grid = WORLD.grid
    assert scoring.preservation_error(noise_edited, source, edited, grid) == 0.0
    err = scoring.preservation_error(noise_unedited, source, edited, grid)
    assert 0.02 < err < 0.5
    s = scoring.score_edit(item["target"], item["target_scene"], item["target_scene"], source, edited)
    assert s == dict(success=True, preservation=0.0)
    s = scoring.score_edit(source, item["inputs"][0]["scene"], item["target_scene"], source, edited)
    assert s == dict(success=False, preservation=0.0)  # "do nothing" preserves but does not edit


def test_subject_scores():
    subject = WORLD.subjects[0]
    other = next(s for s in WORLD.subjects if shapesworld.subject_key(s) != shapesworld.subject_key(subject))
    target = [dict(subject, size="large", cell=[0, 2]), _plain("red", "circle", [2, 0], "small")]
    moved = [dict(target[0], cell=[1, 1]), target[1]]
    wrong = [dict(other, size="large", cell=[0, 2]), target[1]]
    parse = lambda scene: shapesworld.parse_scene(shapesworld.render(scene, WORLD), WORLD)  # noqa: E731
    assert scoring.score_subjects(parse(target), target, [subject]) == dict(identity=True, placement=True,
                                                                             overall=True)
    assert scoring.score_subjects(parse(moved), target, [subject]) == dict(identity=True, placement=False,
                                                                            overall=False)
    assert scoring.score_subjects(parse(wrong), target, [subject]) == dict(identity=False, placement=False,
                                                                            overall=False)
    with pytest.raises(ValueError, match="not in the target"):
        scoring.score_subjects(parse(target), target, [other])


def test_grid_frames_pass_green_and_fail_red(tmp_path):
    items = _samples("subject_edit")[:2]
    rows = [dict(item=items[0], output=items[0]["target"], scores=dict(overall=True)),
            dict(item=items[1], output=items[1]["inputs"][0]["image"], scores=dict(overall=False))]
    grid = np.asarray(scoring.grid_image(rows))
    tile = 2 * 64 + 6  # 64 px images scaled 2x to reach 128 px, in a 3 px frame
    assert grid.shape[0] == 2 * (tile + 14) and grid.shape[1] >= 4 * tile
    assert tuple(grid[14, 2 * tile]) == (30, 170, 30)  # the output column's frame, first row
    assert tuple(grid[2 * 14 + tile, 2 * tile]) == (220, 30, 30)


def test_cli_on_a_random_tiny_checkpoint(tmp_path):
    config = stage3.get_config("tiny")
    params = QueryKontext(QueryKontextConfig.from_config(config)).init(jax.random.key(0))
    saved_model.save_model(tmp_path / "model", config, params, meta={"stage": 3, "step": 0})
    out = tmp_path / "eval"
    paths = evaluate.main(["--checkpoint", str(tmp_path / "model"), "--out", str(out), "--num", "2",
                           "--steps", "1"])
    assert all(os.path.exists(p) for p in paths)
    assert sorted(os.listdir(out)) == sorted(["report.json", "report.md"] + [f"{t}.png" for t in scoring.TASKS])
    report = json.loads((out / "report.json").read_text())
    assert report["config"]["split"] == "test" and report["config"]["size"] == 32
    assert set(report["tasks"]) == set(scoring.TASKS)
    for task, block in report["tasks"].items():
        assert set(scoring.CATEGORIES[task]) <= set(block["metrics"])
        assert ("preservation" in block["metrics"]) == (task in scoring.PRESERVATION_TASKS)
        assert len(block["samples"]) == 2 and set(block["applicable"]) == set(scoring.CATEGORIES[task])
        assert all(set(scoring.CATEGORIES[task]) <= set(s["scores"]) for s in block["samples"])
    md = (out / "report.md").read_text()
    assert all(f"## {t}" in md for t in scoring.TASKS)
    assert set(report["tasks"]["t2i"]["breakdown"]) == {"by_objects", "per_object"} and "Per asked object" in md


def test_evaluation_is_deterministic_for_a_checkpoint_and_seed(tmp_path):
    """The same checkpoint, seed and arguments give the same report and grids; so does the untrained baseline,
    whose random weights come from the seed too."""
    config = stage3.get_config("tiny")
    params = QueryKontext(QueryKontextConfig.from_config(config)).init(jax.random.key(3))
    saved_model.save_model(tmp_path / "model", config, params, meta={"stage": 3, "step": 0})
    args = ["--checkpoint", str(tmp_path / "model"), "--num", "2", "--steps", "2", "--tasks", "t2i", "--tasks", "edit"]
    reports = {}
    for name, extra in (("a", []), ("b", []), ("untrained_a", ["--untrained"]), ("untrained_b", ["--untrained"])):
        evaluate.main(args + extra + ["--out", str(tmp_path / name)])
        report = json.loads((tmp_path / name / "report.json").read_text())
        report["config"].pop("meta")
        reports[name] = report
    assert reports["a"] == reports["b"] and reports["untrained_a"] == reports["untrained_b"]
    for task in ("t2i", "edit"):
        for first, second in (("a", "b"), ("untrained_a", "untrained_b")):
            assert (tmp_path / first / f"{task}.png").read_bytes() == (tmp_path / second / f"{task}.png").read_bytes()
    assert (tmp_path / "a" / "edit.png").read_bytes() != (tmp_path / "untrained_a" / "edit.png").read_bytes()


def test_ceiling_scores_the_targets_through_the_vae_without_sampling(tmp_path, monkeypatch):
    """``--ceiling`` feeds each target image through ``sample.reconstruct`` and scores that; with a lossless
    autoencoder (an identity put in its place) it scores exactly as the ground truth does (at the tiny
    config's 32 px, ``parse_scene`` misreads some sizes, so not 100% everywhere), and the sampler is never
    called."""
    config = stage3.get_config("tiny")
    params = QueryKontext(QueryKontextConfig.from_config(config)).init(jax.random.key(0))
    saved_model.save_model(tmp_path / "model", config, params, meta={"stage": 3, "step": 0})
    seen = []
    monkeypatch.setattr(sampling, "reconstruct", lambda p, images, config: seen.append(images.shape) or images)
    monkeypatch.setattr(sampling.Sampler, "sample", lambda *a, **k: pytest.fail("the ceiling samples nothing"))
    evaluate.main(["--checkpoint", str(tmp_path / "model"), "--out", str(tmp_path / "ceiling"), "--num", "3",
                   "--batch", "2", "--ceiling"])
    report = json.loads((tmp_path / "ceiling" / "report.json").read_text())
    assert report["config"]["meta"]["ceiling"] is True
    assert seen == [(2, 32, 32, 3), (1, 32, 32, 3)] * len(scoring.TASKS)
    world = shapesworld.World.from_config(config.data.world, size=32)
    for task, block in report["tasks"].items():
        items = [shapesworld.generate_sample(world, [0, k], task, "test") for k in range(3)]
        truth = scoring.summarize(task, [scoring.score_sample(it, it["target"], world)["scores"] for it in items])
        assert block["metrics"] == truth, task
        if task in scoring.PRESERVATION_TASKS:
            assert block["metrics"]["preservation"] == 0.0
    with pytest.raises(app.UsageError, match="choose one"):
        evaluate.main(["--checkpoint", str(tmp_path / "model"), "--out", str(tmp_path / "x"), "--untrained",
                       "--ceiling"])


def test_guidance_flags_reach_every_request(tmp_path, monkeypatch):
    """``--cfg-text`` / ``--cfg-image`` go into every request the sampler gets (unset ones stay None: the
    checkpoint's config.sample) and into the report's config; with ``--ceiling`` they are a usage error."""
    config = stage3.get_config("tiny")
    params = QueryKontext(QueryKontextConfig.from_config(config)).init(jax.random.key(0))
    saved_model.save_model(tmp_path / "model", config, params, meta={"stage": 3, "step": 0})
    seen = []

    def fake_sample(self, requests, *, size, steps=None):
        seen.extend((r.task, r.cfg_text, r.cfg_image) for r in requests)
        return [np.zeros(size + (3,), np.uint8) for _ in requests]

    monkeypatch.setattr(sampling.Sampler, "sample", fake_sample)
    base = ["--checkpoint", str(tmp_path / "model"), "--num", "3", "--batch", "2", "--tasks", "t2i", "--tasks",
            "custom"]
    evaluate.main(base + ["--out", str(tmp_path / "a"), "--cfg-image", "3"])
    assert seen == [("t2i", None, 3.0)] * 3 + [("custom", None, 3.0)] * 3
    report = json.loads((tmp_path / "a" / "report.json").read_text())
    assert report["config"]["cfg_image"] == 3.0 and report["config"]["cfg_text"] is None
    seen.clear()
    evaluate.main(base + ["--out", str(tmp_path / "b")])
    assert {(text, image) for _, text, image in seen} == {(None, None)}
    assert "cfg_image" not in json.loads((tmp_path / "b" / "report.json").read_text())["config"]
    with pytest.raises(app.UsageError, match="ceiling samples nothing"):
        evaluate.main(base + ["--out", str(tmp_path / "c"), "--ceiling", "--cfg-text", "2"])


def test_subject_breakdown_says_which_part_of_the_look_fails():
    subject = dict(WORLD.subjects[0], size="large")
    retextured = dict(subject, texture="checker" if subject["texture"] == "stripes" else "stripes")
    flipped = dict(subject, colors=list(reversed(subject["colors"])))
    plain = _plain("red", "circle", [0, 0])
    samples = [  # (target, prediction): right; retextured; colours swapped and a plain object beside; missing
        ([dict(subject, cell=[0, 2])], [dict(subject, cell=[0, 2])]),
        ([dict(subject, cell=[1, 1])], [dict(retextured, cell=[1, 1])]),
        ([dict(subject, cell=[2, 2]), plain], [dict(flipped, cell=[2, 2]), plain]),
        ([dict(subject, cell=[2, 0])], [_plain("red", subject["shape"], [2, 0]), dict(subject, cell=[0, 0])]),
    ]
    out = scoring.subject_breakdown([dict(target_scene=t, pred_scene=p) for t, p in samples])["per_subject"]
    assert out == dict(placed=1.0, subject=0.75, shape=1.0, texture=0.5, colors=0.5, look=0.25, anywhere=0.5,
                       subjects=4)
    md = "\n".join(scoring._breakdown_markdown(dict(per_subject=out)))
    assert "| 100.0% | 75.0% | 100.0% | 50.0% | 50.0% | 25.0% | 50.0% |" in md


def test_edit_breakdown_per_operation():
    samples = [dict(op=dict(kind=kind), scores=dict(success=ok, preservation=p))
               for kind, ok, p in (("remove", True, 0.0), ("remove", False, 0.02), ("recolor", False, 0.01))]
    out = scoring.edit_breakdown(samples)["by_op"]
    assert out == dict(recolor=dict(num=1, metrics=dict(success=0.0, preservation=0.01)),
                       remove=dict(num=2, metrics=dict(success=0.5, preservation=0.01)))
    md = "\n".join(scoring._breakdown_markdown(dict(by_op=out)))
    assert "| remove | 2 | 50.0% | 0.0100 |" in md


def test_evaluate_progress_leaves_the_compilation_out_and_logs_every_ten_seconds():
    # Calls of 8 samples ending at t = 30 (the first, with its compilation), 31, 35, 40.5 and 52.5 s: the first
    # line has no rate, the next comes 10 s after it, rates count from the end of the first call, the last logs.
    times, lines = iter([30.0, 31.0, 35.0, 40.5, 52.5]), []
    progress = scoring._Progress("evaluate t2i", 40, clock=lambda: next(times), log=lines.append)
    shown = [progress.update(done) for done in (8, 16, 24, 32, 40)]
    assert shown[1] is None and shown[2] is None
    assert lines == ["evaluate t2i: 8/40 samples", "evaluate t2i: 32/40 samples | 2.29 samples/s | ETA 3.5s",
                     "evaluate t2i: 40/40 samples | 1.42 samples/s | ETA 0.0s"]
