"""qk_jax.ablate: variant configs, the verdicts against the paper's orderings, the table; end to end (slow)."""

import json
import os
import subprocess
import sys

import pytest

from configs import shapes as shapes_config
from qk_jax.training import ablations, metrics

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _row(value, loss=None, **metrics):
    return dict(value=value, steps=10, loss=loss, metrics=metrics)


def test_variant_config_sets_the_key_tasks_and_start(tmp_path):
    config = shapes_config.get_config("tiny")
    config.stage0 = None  # keep stage 0 out of this unit test
    stage = ablations.variant_config(config, "conditioning", "queries_only", str(tmp_path), steps=7)
    assert (stage.conditioning, stage.stage, stage.total_steps) == ("queries_only", 1, 7)
    assert stage.tasks == config.stages[0].tasks
    assert config.stages[0].conditioning == "text_and_queries"  # the curriculum's config is untouched
    with pytest.raises(FileNotFoundError, match="run the curriculum first"):
        ablations.variant_config(config, "source_offset", "axis0", str(tmp_path), steps=7)
    os.makedirs(tmp_path / "stage2" / "final")
    stage = ablations.variant_config(config, "source_offset", "axis0", str(tmp_path), steps=None)
    assert (stage.source_offset, stage.stage, dict(stage.tasks)) == ("axis0", 3, {"edit": 1.0})
    assert stage.init_from == str(tmp_path / "stage2")
    with pytest.raises(ValueError, match="unknown value"):
        ablations.variant_config(config, "placement", "task", str(tmp_path), steps=None)


def test_verdicts_follow_the_paper_orderings():
    rows = [_row("text_and_queries", 0.30), _row("text_only", 0.32), _row("queries_only", 0.40)]
    assert "agrees" in ablations.verdict("conditioning", rows) and "disagrees" not in ablations.verdict("conditioning", rows)
    rows[0]["loss"] = 0.5
    assert "disagrees" in ablations.verdict("conditioning", rows)
    custom = lambda identity, placement: dict(custom=dict(identity=identity, placement=placement, overall=0.0))
    good = [_row("source", **custom(0.9, 0.5)), _row("reference", **custom(0.7, 0.8))]
    assert "(agrees" in ablations.verdict("placement", good)
    bad = [_row("source", **custom(0.6, 0.5)), _row("reference", **custom(0.7, 0.8))]
    assert "does not fully agree" in ablations.verdict("placement", bad)
    edit = lambda l1: dict(edit=dict(success=0.5, preservation=l1))
    assert "axis0" in ablations.verdict("source_offset", [_row("negate", **edit(0.05)), _row("axis0", **edit(0.02))])
    assert "negate" in ablations.verdict("source_offset", [_row("negate", **edit(0.01)), _row("axis0", **edit(0.02))])


def test_markdown_has_a_row_per_variant():
    rows = [_row("negate", 0.1, edit=dict(success=0.5, preservation=0.02)),
            _row("axis0", 0.2, edit=dict(success=0.25, preservation=0.03))]
    table = ablations.markdown({"source_offset": rows})
    assert "| negate | 10 | 0.1000 | 0.0200 | 50.0% |" in table
    assert "| axis0 | 10 | 0.2000 | 0.0300 | 25.0% |" in table
    assert "Measured: lower preservation error: negate" in table


def test_earlier_results_keep_the_ablations_not_rerun(tmp_path):
    row = lambda value: dict(ablation="x", value=value, steps=1, loss=0.1, metrics={})  # noqa: E731
    assert ablations.earlier_results(str(tmp_path), keep=list(ablations.ABLATIONS)) == {}
    (tmp_path / "ablations.json").write_text(json.dumps(
        {"source_offset": [row("negate")], "conditioning": [row("text_and_queries")]}))
    kept = ablations.earlier_results(str(tmp_path), keep=["conditioning", "placement"])
    assert kept == {"conditioning": [row("text_and_queries")]}


def test_tail_loss_reads_the_metrics_log(tmp_path):
    """The mean loss of the last quarter of the logged steps; steps without a loss (evaluation lines) are skipped."""
    with open(tmp_path / metrics.JSONL, "w") as f:
        for step in range(1, 9):
            f.write(json.dumps(dict(step=step, loss=float(step))) + "\n")
        f.write(json.dumps(dict(step=9, lr=0.1)) + "\n")
    assert ablations.tail_loss(str(tmp_path)) == pytest.approx((7 + 8) / 2)
    assert ablations.tail_loss(str(tmp_path), fraction=1.0) == pytest.approx(4.5)


@pytest.mark.slow
def test_ablations_run_end_to_end_on_the_tiny_curriculum(tmp_path):
    """The tiny curriculum, then every ablation for 2 steps each, scored on 1 sample: the table is written."""
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    run = lambda *args: subprocess.run([sys.executable, "-m", *args], cwd=ROOT, env=env, check=True, timeout=1200,
                                       capture_output=True, text=True)
    run("qk_jax.train", "--config", "configs/shapes.py:tiny", "--workdir", str(tmp_path))
    run("qk_jax.ablate", "--config", "configs/shapes.py:tiny", "--workdir", str(tmp_path), "--steps", "2", "--num", "1")
    results = json.loads((tmp_path / "ablations" / "ablations.json").read_text())
    assert [r["value"] for r in results["conditioning"]] == ["text_and_queries", "text_only", "queries_only"]
    assert all(r["loss"] is not None for rows in results.values() for r in rows)
    assert "## source_offset" in (tmp_path / "ablations" / "ablations.md").read_text()
