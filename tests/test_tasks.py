"""The task vocabulary: the one table of tasks and input roles, and every reader of it agreeing with it."""

import pytest

from qk_jax import sampling
from qk_jax.data import manifest, shapesworld, tasks
from qk_jax.data.manifest import RecordError
from qk_jax.evaluation import attention_maps, scoring
from qk_jax.ops import rope


def test_the_derived_task_lists():
    assert tasks.SAMPLING_TASKS == ("t2i", "edit", "custom", "multi", "subject_edit")
    assert tasks.IN_CONTEXT_TASKS == ("edit", "custom", "multi", "subject_edit")
    assert tasks.SOURCE_TASKS == ("edit", "subject_edit")
    # Every reader takes its list from here.
    assert manifest.TASKS is shapesworld.TASKS is tasks.TASKS
    assert scoring.TASKS == tasks.SAMPLING_TASKS and scoring.PRESERVATION_TASKS == tasks.SOURCE_TASKS
    assert attention_maps.TASKS == tasks.IN_CONTEXT_TASKS


@pytest.mark.parametrize("task, counts, ok", [
    ("t2i", {}, True), ("t2i", {"vlm": 1}, False),
    ("recon", {"vlm": 1}, True), ("recon", {"vlm": 2}, False),
    ("transform", {"vlm": 3}, True), ("transform", {}, False),
    ("edit", {"source": 1, "vlm": 2}, True), ("edit", {"source": 2}, False),
    ("edit", {"source": 1, "reference": 1}, False),
    ("custom", {"reference": 1}, True), ("custom", {"reference": 2}, False),
    ("multi", {"reference": 2}, True), ("multi", {"reference": 5}, True), ("multi", {"reference": 1}, False),
    ("subject_edit", {"source": 1, "reference": 2}, True), ("subject_edit", {"source": 1}, False),
])
def test_check_inputs_follows_the_table(task, counts, ok):
    if ok:
        tasks.check_inputs(task, counts)
    else:
        with pytest.raises(ValueError, match=f"task '{task}' takes"):
            tasks.check_inputs(task, counts)


def test_messages_name_the_better_task():
    with pytest.raises(ValueError, match="use task 'multi'"):
        tasks.check_inputs("custom", {"reference": 2})
    with pytest.raises(ValueError, match="use task 'custom'"):
        tasks.check_inputs("multi", {"reference": 1})
    with pytest.raises(ValueError, match="unknown task 'paint'; use one of t2i, recon"):
        tasks.check_inputs("paint", {})


def test_the_manifest_and_the_sampler_agree_on_custom():
    """Both readers of the rule refuse a two-reference custom record / request and accept one reference."""
    row = dict(id="r", task="custom", prompt="p", target="t.png",
               inputs=[dict(path="a.png", role="reference"), dict(path="b.png", role="reference")])
    with pytest.raises(RecordError, match="use task 'multi'"):
        manifest.parse_record(row, record_id="r")
    with pytest.raises(ValueError, match="use task 'multi'"):
        sampling.task_roles("custom", 2, max_references=4)
    manifest.parse_record(dict(row, inputs=row["inputs"][:1]), record_id="r")
    assert sampling.task_roles("custom", 1, max_references=4) == (rope.REFERENCE,)
    assert tasks.sampling_roles("subject_edit", 3) == ("source", "reference", "reference")
