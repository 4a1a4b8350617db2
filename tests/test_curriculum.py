"""The curriculum (stage 0, stages 1 -> 2 -> 3, the evaluation) end to end at tiny scale in a bucket workdir, stage
transitions, and (slow) the shortened ShapesWorld curriculum learning t2i."""

import json
import os

import chex
import jax
import numpy as np
import pytest

import gcs_emulator
from configs import shapes as shapes_config
from qk_jax import sampling, storage
from qk_jax.models import saved_model
from qk_jax.parallel import mesh as mesh_lib
from qk_jax.pytree import flatten
from qk_jax.training import curriculum as curriculum_lib
from qk_jax.training import loop, metrics, stage0


@pytest.fixture(scope="module")
def curriculum(tmp_path_factory, tiny_stage0):
    """The tiny curriculum with ``--workdir gs://...``, as a pod runs it (``gcs_emulator``'s in-memory bucket on
    localhost; this process talks to it while the fixture lasts). Its stage 0 is conftest's (tests/test_stage0.py
    tests stage 0 itself), put in the bucket finished: run_curriculum fetches and imports it, as a rerun of the
    README command on another host does, and trains none of it. Stages 1 -> 2 -> 3 each start from the one
    before in the bucket; the evaluation writes its report there."""
    with gcs_emulator.bucket_environment(str(tmp_path_factory.mktemp("curriculum_host"))) as bucket:
        workdir = storage.join(bucket, "curriculum")
        storage.copy_tree(tiny_stage0[0], storage.join(workdir, stage0.DIRNAME), last=stage0.RESULT_FILE)
        with pytest.MonkeyPatch.context() as no_stage0:
            for name in ("pretrain_vae", "pretrain_vlm"):
                no_stage0.setattr(stage0, name, lambda *a, **k: pytest.fail("stage 0 trained again"))
            curriculum_lib.run_curriculum(shapes_config.get_config("tiny"), workdir)
        yield workdir


def _final(workdir, stage):
    return saved_model.load_model(storage.join(workdir, f"stage{stage}", "final"))


def test_curriculum_runs_every_stage(curriculum, monkeypatch):
    for stage in (1, 2, 3):
        run = storage.join(curriculum, f"stage{stage}")
        records = metrics.read_jsonl(storage.join(run, metrics.JSONL))
        losses = [r["loss"] for r in records.values()]
        assert len(losses) == 2 and all(np.isfinite(losses)), records
        assert len(storage.read_bytes(storage.join(run, "loss.png"))) > 1000
        config, _, meta = _final(curriculum, stage)
        assert meta["stage"] == stage == config.stage and meta["step"] == 2
    # Complete: rerunning skips stage 0, every stage and the evaluation (none of them may start again).
    rerun = lambda *a, **k: pytest.fail("a finished part of the curriculum ran again")
    for module, name in ((stage0, "pretrain_vae"), (stage0, "pretrain_vlm"), (loop, "build"),
                         (sampling.Sampler, "from_checkpoint")):
        monkeypatch.setattr(module, name, rerun)
    curriculum_lib.run_curriculum(shapes_config.get_config("tiny"), curriculum)


def test_every_file_of_the_curriculum_is_in_the_bucket(curriculum):
    files = set(storage.files_under(curriculum))
    for name in ("stage1/final/config.json", "stage2/final/config.json", "stage3/final/config.json",
                 "stage3/metrics.jsonl", "eval/report.md", "eval/trained/seed_0/report.json",
                 "eval/trained/summary.md"):
        assert name in files, sorted(files)
    assert any(f.startswith("eval/trained/seed_0/") and f.endswith(".png") for f in files)
    assert not os.path.exists("gs:") and not os.path.exists(os.path.join(os.path.dirname(__file__), "..", "gs:"))
    report = storage.read_text(storage.join(curriculum, "eval", "report.md"))
    assert report.startswith(f"# {curriculum}/stage3/final: trained vs untrained")


def test_curriculum_ends_with_the_evaluation_beside_the_untrained_baseline(curriculum):
    summaries = {name: json.loads(storage.read_text(storage.join(curriculum, "eval", name, "summary.json")))
                 for name in ("trained", "untrained", "ceiling")}
    assert summaries["untrained"]["meta"]["untrained"] and not summaries["trained"]["meta"].get("untrained")
    assert summaries["ceiling"]["meta"]["ceiling"] and not summaries["trained"]["meta"].get("ceiling")
    for summary in summaries.values():
        assert set(summary["tasks"]) == {"t2i", "edit", "custom", "multi", "subject_edit"}
        assert 0.0 <= summary["tasks"]["edit"]["preservation"]["mean"] <= 1.0
    report = storage.read_text(storage.join(curriculum, "eval", "report.md"))
    assert "| t2i | colors |" in report and "trained | untrained | ceiling" in report
    assert len(storage.read_bytes(storage.join(curriculum, "eval", "trained", "seed_0", "t2i.png"))) > 1000

def test_stage_transitions(curriculum):
    c1, p1, _ = _final(curriculum, 1)
    _, p2, _ = _final(curriculum, 2)
    _, p3, _ = _final(curriculum, 3)
    # 1 -> 2: the VLM LoRA is merged: W + alpha / r * A @ B, and no adapter is left.
    flat1, flat2 = flatten(p1["vlm"]), flatten(p2["vlm"])
    assert any(k.endswith("lora_b") for k in flat1) and not any("lora" in k for k in flat2)
    merged = 0
    for path, w in flat2.items():
        module = path.rsplit("/", 1)[0]
        if path.endswith("kernel") and f"{module}/lora_a" in flat1:
            a, b = np.asarray(flat1[f"{module}/lora_a"], np.float64), np.asarray(flat1[f"{module}/lora_b"], np.float64)
            want = np.asarray(flat1[path], np.float64) + c1.vlm.lora.alpha / a.shape[-1] * a @ b
            np.testing.assert_allclose(np.asarray(w), want, atol=1e-6)
            merged += 1
    assert merged == 7 * c1.vlm.text.num_hidden_layers
    # 2 -> 3: the frozen VLM and VAE, and the MMDiT's base weights, are bit-identical after stage 3's steps;
    # only the new adapters, the connector and the kontext queries moved.
    frozen_vlm = lambda p: {k: v for k, v in p["vlm"].items() if k != "kontext_queries"}
    chex.assert_trees_all_equal(frozen_vlm(p3), frozen_vlm(p2))
    assert np.any(np.asarray(p3["vlm"]["kontext_queries"]) != np.asarray(p2["vlm"]["kontext_queries"]))
    chex.assert_trees_all_equal(p3["vae"], p2["vae"])
    flat3 = flatten(p3["mmdit"])
    for path, value in flatten(p2["mmdit"]).items():
        np.testing.assert_array_equal(flat3[path], value, err_msg=path)
    assert any(k.endswith("lora_b") and np.any(v) for k, v in flat3.items())

def test_a_stage_refuses_the_wrong_previous_stage(curriculum, tmp_path):
    from configs import stage3
    from qk_jax.training import stages

    config = stage3.get_config("tiny")
    config.init_from = storage.join(curriculum, "stage1")  # stage 3 must start from stage 2
    with pytest.raises(saved_model.CheckpointMismatchError, match="stage 1 model, but stage 3 starts from stage 2"):
        loop.build(config, mesh_lib.make_mesh(config.mesh))
    config.init_from = storage.join(curriculum, "stage2")
    config.connector.hidden_features = 24  # another connector than the one stage 2 trained
    with pytest.raises(saved_model.CheckpointMismatchError, match=r"connector differs .*hidden_features"):
        stages.initial_params(None, config, jax.random.key(0))
    assert storage.exists(storage.join(curriculum, "stage3", "frozen"))  # frozen weights saved once per stage

@pytest.mark.slow
def test_shortened_shapes_curriculum_learns_t2i_colors(tmp_path):
    """Issue 9's acceptance test, about an hour on 2 CPU cores: stage 0 and stage 1 as the README's curriculum
    runs them, then 4,000 steps of stage 2 on text-to-image alone (no stage 3), then the held-out t2i evaluation
    of the trained model and of its untrained baseline (same config, VLM/connector/MMDiT re-initialised, VAE kept).

    Measured (2026-11-26, 50 prompts, untrained in brackets): after 2,400 stage-2 steps colours 8% (0%), position
    52% (8%), single object 80% (0%); continued to 4,000 steps: colours 32%, position 98%, single object 80%.
    This test as written, from scratch (65 minutes): colours 22%, position 88%, single object 100%.
    2026-11-27 (stage 2's VLM at a tenth, the MMDiT's sin-cos position embedding; 69 minutes, another training
    sharing the cores for 40 of them): colours 16% (0%), position 48% (8%), single object 100% (0%), overall
    12%. That run failed only on the floating-point comparison 0.48 >= 0.08 + 0.4; with the tolerance below the
    same figures pass, with no prompt to spare (colours 8 of 50, 7.5 needed; position 24, 24 needed). The same
    first 50 prompts from the same base without the embedding (3,500 steps): colours 6%, position 22%, single
    object 80%. Rerun on 2026-11-28 (tenth session) with stage 2 at higher noise (``flow.mean`` 1.0) and the
    warmup-stable-decay schedule (its last 800 steps anneal); 85 minutes, sharing the 2 cores with other
    trainings throughout: colours 74% (0%), position 100% (8%), single object 100% (0%), two objects 62% (0%),
    overall 46% (0%). Passed with margin on every assertion.
    """
    config = shapes_config.get_config("shapes")
    config.stages = config.stages[:2]  # stage 1, stage 2
    stage2 = config.stages[1]
    stage2.tasks = {"t2i": 1.0}
    stage2.total_steps = 4000
    stage2.checkpoint_every = 1000
    config.evaluate.tasks = ("t2i",)
    config.evaluate.samples_per_task = config.evaluate.untrained_samples = 50
    curriculum_lib.run_curriculum(config, str(tmp_path))

    def scores(name):
        with open(tmp_path / "eval" / name / "summary.json") as f:
            return {k: v["mean"] for k, v in json.load(f)["tasks"]["t2i"].items() if v is not None}

    trained, untrained = scores("trained"), scores("untrained")
    print(json.dumps(dict(trained=trained, untrained=untrained)))
    # Margins in score points; shares of 50 prompts are multiples of 0.02, so compare with a rounding tolerance
    # (0.08 + 0.4 > 0.48 in floating point).
    beats = lambda key, margin: trained[key] >= untrained[key] + margin - 1e-9
    assert beats("colors", 0.15), (trained, untrained)
    assert beats("position", 0.4), (trained, untrained)
    assert beats("single_object", 0.5), (trained, untrained)


def test_a_finished_stage_is_skipped_only_for_its_own_config(curriculum):
    """The config that made a stage is saved with it: the same one skips, another names what differs."""
    import copy

    from qk_jax.training import stage0 as stage0_lib

    config = shapes_config.get_config("tiny")
    result = stage0_lib.run(config, storage.join(curriculum, stage0_lib.DIRNAME))  # finished: read, not rerun
    stage1 = stage0_lib.with_stage0(copy.deepcopy(config.stages[0]), result, first=True)
    workdir = storage.join(curriculum, stage1.name)
    assert loop.train_stage(stage1, workdir) == storage.join(workdir, "final")  # the same config: skipped
    stage1.optim.lr = 0.5
    with pytest.raises(saved_model.CheckpointMismatchError, match=r"stage 1 finished in .* with another config: "
                                                                   r"optim.lr: 0.001 when it ran, 0.5 now"):
        loop.train_stage(stage1, workdir)


def test_the_curriculum_eta_counts_the_later_stages_still_to_run(tmp_path):
    # Per stage, the planner's FLOPs (per sample x batch x steps) of the unfinished stages after it.
    from qk_jax.parallel import planner

    config = shapes_config.get_config("tiny")
    work = [planner.Planner(s).flops_per_sample * s.batch_size * s.total_steps for s in config.stages]
    assert min(work) > 0
    assert curriculum_lib._later_flops(config, str(tmp_path)) == pytest.approx([work[1] + work[2], work[2], 0.0])
    done = tmp_path / config.stages[2].name / "final"
    done.mkdir(parents=True)
    (done / saved_model.MODEL_CONFIG_FILE).write_text("{}")
    assert curriculum_lib._later_flops(config, str(tmp_path)) == pytest.approx([work[1], 0.0, 0.0])
