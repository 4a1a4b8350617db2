"""Record schema, validation messages, path safety, JSONL manifests and the ArrayRecord converter."""

import io
import json
import os

import numpy as np
import pytest
from PIL import Image

from absl import app

from qk_jax.data import manifest, manifest_tool
from qk_jax.data.manifest import RecordError


def _record(**over):
    base = dict(id="r1", task="subject_edit", prompt="add <image 2> at the top of <image 1>", target="t.png",
                inputs=[dict(path="s.png", role="source"), dict(path="refs/a.png", role="reference")])
    base.update(over)
    return base


def _write(path, rows):
    with open(path, "w") as f:
        for row in rows:
            f.write((row if isinstance(row, str) else json.dumps(row)) + "\n")
    return str(path)


def test_parse_record_and_prompt_segments():
    record = manifest.parse_record(_record(meta=dict(scene=[1])), record_id="m:1", root="/data")
    assert record.id == "r1" and record.roles == ("source", "reference") and record.meta == dict(scene=[1])
    assert record.segments() == ["add ", 1, " at the top of ", 0]
    # Unplaced inputs come first, in order.
    assert manifest.prompt_segments("make it <image 2> colored", 3) == [0, 2, "make it ", 1, " colored"]
    assert manifest.prompt_segments("", 1) == [0]


@pytest.mark.parametrize("over,kind,field", [
    (dict(task="paint"), "unknown_task", "task"),
    (dict(prompt=3), "invalid", "prompt"),
    (dict(target=None), "invalid", "target"),
    (dict(promt="typo"), "invalid", "promt"),
    (dict(inputs=[dict(path="s.png", role="mask")]), "invalid", "inputs[0].role"),
    (dict(inputs=[dict(path="s.png")]), "invalid", "inputs[0]"),
    (dict(target="/etc/passwd"), "unsafe_path", "target"),
    (dict(target="C:\\x.png"), "unsafe_path", "target"),
    (dict(target="a/../../x.png"), "unsafe_path", "target"),
    (dict(inputs=[dict(path="../s.png", role="source"), dict(path="r.png", role="reference")]), "unsafe_path",
     "inputs[0].path"),
    (dict(prompt="<image 3> here"), "invalid", "prompt"),
    (dict(prompt="<image 1> and <image 1>"), "invalid", "prompt"),
    (dict(inputs=[dict(path="r.png", role="reference")] * 3), "too_many_references", "inputs"),
    (dict(task="edit"), "invalid", "inputs"),  # edit takes no reference
    (dict(task="t2i"), "invalid", "inputs"),
    (dict(task="multi", inputs=[dict(path="r.png", role="reference")], prompt="x"), "invalid", "inputs"),
    (dict(meta=[1]), "invalid", "meta"),
])
def test_validation_names_record_and_field(over, kind, field):
    with pytest.raises(RecordError) as info:
        manifest.parse_record(_record(**over), record_id="m:1", max_references=2)
    err = info.value
    assert (err.kind, err.record_id, err.field) == (kind, "r1", field)
    assert "'r1'" in str(err) and repr(field) in str(err)


def test_paths_are_normalised_inside_the_root():
    record = manifest.parse_record(_record(target="a/./b/../t.png"), record_id="m:1")
    assert record.target == "a/t.png"


def test_jsonl_manifest_counts_bad_rows(tmp_path):
    good = [_record(id=f"g{i}") for i in range(4)]
    rows = good[:2] + ["{not json", "[1, 2]", _record(id="u", task="paint"), "", _record(id="e", target="../x")] + \
        good[2:] + [{"task": "t2i", "prompt": "x"}]
    m = manifest.JsonlManifest(_write(tmp_path / "m.jsonl", rows), max_references=2)
    assert len(m) == 4 and [m[i].id for i in range(4)] == ["g0", "g1", "g2", "g3"]
    assert dict(m.problems) == dict(unparsable=2, unknown_task=1, unsafe_path=1, invalid=1)
    assert "'m.jsonl:3'" in m.examples["unparsable"]  # no id: named by file and line
    assert "'m.jsonl:10'" in m.examples["invalid"] and "'target'" in m.examples["invalid"]
    assert m.tasks() == ["subject_edit"] * 4
    assert m[2].index == 7 and m[0].root == str(tmp_path)


def test_read_refuses_missing_files_and_symlinks_out_of_root(tmp_path):
    root = tmp_path / "root"
    root.mkdir()
    (root / "t.png").write_bytes(b"abc")
    (tmp_path / "secret.png").write_bytes(b"secret")
    os.symlink(tmp_path / "secret.png", root / "link.png")
    record = manifest.parse_record(_record(), record_id="m:1", root=str(root))
    assert record.read(record.target) == b"abc"
    with pytest.raises(RecordError) as info:
        record.read(record.inputs[0].image, "inputs[0].path")
    assert info.value.kind == "missing_file" and info.value.field == "inputs[0].path"
    linked = manifest.parse_record(_record(target="link.png"), record_id="m:1", root=str(root))
    with pytest.raises(RecordError, match="outside the dataset root") as info:
        linked.read(linked.target)
    assert info.value.kind == "unsafe_path"


def _dataset(tmp_path):
    images = {"t.png": b"T" * 10, "s.png": b"S" * 7, "refs/a.png": b"A" * 5, "u.png": b"U"}
    for name, data in images.items():
        (tmp_path / name).parent.mkdir(exist_ok=True)
        (tmp_path / name).write_bytes(data)
    rows = [
        _record(id="se"),
        dict(id="t2i", task="t2i", prompt="a red circle", target="u.png", negative_prompt="blurry"),
        dict(id="rec", task="recon", prompt="redraw <image 1>", target="t.png",
             inputs=[dict(path="t.png", role="vlm")]),
        dict(id="gone", task="t2i", prompt="x", target="missing.png"),
        "garbage",
        dict(id="t2i-b", task="t2i", prompt="b", target="t.png", meta=dict(k=[1, 2])),
    ]
    return _write(tmp_path / "m.jsonl", rows), images


def test_arrayrecord_roundtrip(tmp_path):
    path, images = _dataset(tmp_path)
    index = manifest.to_arrayrecord(path, str(tmp_path / "ar"), records_per_shard=2)
    assert index["num_records"] == 4 and len(index["shards"]) == 2
    assert index["skipped"] == dict(unparsable=1, missing_file=1)
    assert index["tasks"] == dict(t2i=[0, 2], recon=[2, 3], subject_edit=[3, 4])
    m = manifest.open_manifest(str(tmp_path / "ar"), max_references=2)
    assert len(m) == 4 and m.tasks() == ["t2i", "t2i", "recon", "subject_edit"]
    by_id = {m[i].id: m[i] for i in range(len(m))}
    assert by_id["t2i"].target == images["u.png"] and by_id["t2i"].negative_prompt == "blurry"
    assert by_id["t2i-b"].meta == dict(k=[1, 2])
    se = by_id["se"]
    assert se.read(se.target) == images["t.png"] and se.prompt == _record()["prompt"]
    assert [i.image for i in se.inputs] == [images["s.png"], images["refs/a.png"]]
    assert se.roles == ("source", "reference")
    rec = by_id["rec"]
    assert rec.inputs[0].image == rec.target == images["t.png"]
    raw = manifest.encode_record(rec)
    assert raw.count(images["t.png"]) == 1  # stored once


def test_decode_record_rejects_malformed_bytes():
    with pytest.raises(RecordError, match="bad magic"):
        manifest.decode_record(b"\x80junk", index=3)
    good = manifest.encode_record(manifest.Record(id="x", task="t2i", prompt="p", target=b"img"))
    with pytest.raises(RecordError, match="add up") as info:
        manifest.decode_record(good + b"extra", index=3)
    assert info.value.record_id == "arrayrecord:3"
    assert manifest.decode_record(good).target == b"img"


def test_command_line(tmp_path, capsys):
    path, _ = _dataset(tmp_path)
    manifest_tool.main(["--validate", path])
    out = capsys.readouterr().out  # validate decodes every image: these "images" are a few repeated bytes
    assert "0 good records" in out and "skipped 1 x unparsable" in out
    assert "skipped 4 x corrupt_image" in out and "skipped 1 x missing_file" in out
    manifest_tool.main(["--to-arrayrecord", path, "--out", str(tmp_path / "ar"), "--records-per-shard", "3"])
    out = capsys.readouterr().out
    assert "4 records in 2 shards" in out and "missing_file" in out
    manifest_tool.main(["--validate", str(tmp_path / "ar")])
    assert "0 good records: {}\nskipped 4 x corrupt_image" in capsys.readouterr().out
    with pytest.raises(FileNotFoundError, match="to-arrayrecord"):
        manifest.open_manifest(str(tmp_path))


@pytest.mark.parametrize("argv,problem", [
    ([], "neither --validate nor --to-arrayrecord"),
    (["--validate", "a.jsonl", "--to-arrayrecord", "a.jsonl"], "both --validate and --to-arrayrecord"),
    (["--to-arrayrecord", "a.jsonl"], "needs --out DIR"),
    (["--validate", "a.jsonl", "--out", "x"], "go with --to-arrayrecord"),
    (["--validate", "missing.jsonl"], "missing.jsonl not found"),
])
def test_command_line_usage_errors(tmp_path, monkeypatch, argv, problem):
    """A misused command is one usage error naming the problem and the fix."""
    monkeypatch.chdir(tmp_path)
    with pytest.raises(app.UsageError, match=problem):
        manifest_tool.main(argv)


def test_lines_too_deep_or_too_long_are_unparsable_rows(tmp_path, monkeypatch):
    """A JSON line nested 100,000 deep (a RecursionError in json) or longer than the line limit is a counted bad
    row; the good rows around it are kept."""
    monkeypatch.setattr(manifest, "MAX_LINE_CHARS", 300_000)
    good = json.dumps(dict(id="ok", task="t2i", prompt="a red circle", target="a.png"))
    deep = "[" * 100_000 + "]" * 100_000
    nested: list = []
    for _ in range(40):  # 40 levels: json reads it, the depth limit refuses it
        nested = [nested]
    shallow_but_nested = json.dumps(dict(id="n", task="t2i", prompt="p", target="a.png", meta={"a": nested}))
    long = json.dumps(dict(id="long", task="t2i", prompt="x" * 400_000, target="a.png"))
    path = tmp_path / "m.jsonl"
    path.write_text("\n".join([good, deep, good.replace('"ok"', '"ok2"'), shallow_but_nested, long, good]) + "\n")
    m = manifest.JsonlManifest(str(path))
    assert [m[i].id for i in range(len(m))] == ["ok", "ok2", "ok"]
    assert m.problems == {"unparsable": 3}, (m.problems, m.examples)
    assert "nested deeper than 32 levels" in m.examples["unparsable"]  # the first bad row: the 100,000-deep one
    with pytest.raises(manifest.RecordError, match="400,0.. characters, over the 300,000 limit"):
        manifest.parse_json(long, "r", "<line>")


def _png(seed: int, size=(16, 16)) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (size[1], size[0], 3), np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def test_validate_reads_and_decodes_every_image(tmp_path):
    """A record is good only when its target and every input exist and decode; the others are counted by kind,
    the first of each kind named by record and field. The same holds for ArrayRecord shards (their bytes)."""
    (tmp_path / "refs").mkdir()
    files = {"a.png": _png(0), "b.png": _png(1), "refs/s.png": _png(2), "cut.png": _png(3)[:200], "txt.png": b"text",
             "empty.png": b"", "big.png": _png(4, size=(64, 64))}
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    src, ref = dict(path="a.png", role="source"), dict(path="refs/s.png", role="reference")
    rows = [
        dict(id="ok-t2i", task="t2i", prompt="p", target="a.png"),
        _record(id="ok-se", target="b.png", inputs=[src, ref]),
        dict(id="ok-again", task="edit", prompt="p", target="a.png", inputs=[dict(path="b.png", role="source")]),
        dict(id="gone", task="t2i", prompt="p", target="missing.png"),
        _record(id="gone-input", target="b.png", inputs=[src, dict(path="refs/missing.png", role="reference")]),
        dict(id="cut", task="t2i", prompt="p", target="cut.png"),
        dict(id="txt", task="edit", prompt="p", target="a.png", inputs=[dict(path="txt.png", role="source")]),
        dict(id="empty", task="t2i", prompt="p", target="empty.png"),
        dict(id="big", task="t2i", prompt="p", target="big.png"),
        dict(id="bad-task", task="paint", prompt="p", target="a.png"),
    ]
    path = _write(tmp_path / "m.jsonl", rows)
    lines = manifest_tool.main(["--validate", path, "--max-image-pixels", "1000", "--workers", "2"])
    assert lines[0] == "3 good records: {'t2i': 1, 'subject_edit': 1, 'edit': 1}", lines
    problems = {line.split(" x ")[1].split(",")[0]: line for line in lines[1:]}
    assert {kind: int(line.split(" ")[1]) for kind, line in problems.items()} == dict(
        missing_file=2, corrupt_image=2, empty_image=1, too_large=1, unknown_task=1)
    assert "record 'gone', field 'target'" in problems["missing_file"]
    assert "record 'cut', field 'target'" in problems["corrupt_image"]
    assert "1,000-pixel limit" in problems["too_large"]
    # The same records as ArrayRecord shards: the converter skips what it cannot read; validate decodes the rest.
    manifest_tool.main(["--to-arrayrecord", path, "--out", str(tmp_path / "ar")])
    lines = manifest_tool.main(["--validate", str(tmp_path / "ar"), "--max-image-pixels", "1000", "--workers", "0"])
    assert lines[0].startswith("3 good records") and len(lines) == 4, lines
    assert [line.split(",")[0] for line in lines[1:]] == ["skipped 2 x corrupt_image", "skipped 1 x empty_image",
                                                         "skipped 1 x too_large"]


def test_decoding_flags_go_with_validate(tmp_path):
    path, _ = _dataset(tmp_path)
    with pytest.raises(app.UsageError, match="--max-image-pixels and --workers go with --validate"):
        manifest_tool.main(["--to-arrayrecord", path, "--out", str(tmp_path / "ar"), "--workers", "2"])
