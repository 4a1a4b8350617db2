"""``qk_jax.data.ingest`` through its command, ``python -m qk_jax.data.prepare``: an image folder, parquet, a
``save_to_disk`` folder and webdataset shards, each built here with bad rows of several kinds, become a manifest
whose good records are all there (images stored once, byte-identical where no re-encoding was needed) and whose bad
rows are counted per kind; the manifests train."""

import io
import json
import os
import shutil
import sys
import tarfile

import numpy as np
import pyarrow as pa
import pyarrow.ipc  # noqa: F401 -- pa.ipc, pa.parquet
import pyarrow.parquet  # noqa: F401
import pytest
from absl import app
from PIL import Image

from qk_jax.data import images, ingest, manifest, manifest_tool, prepare

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _image(fmt="PNG", seed=0, size=(32, 32)) -> bytes:
    """A small image of noise (every one different), encoded as ``fmt``."""
    pixels = np.random.default_rng(seed).integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format=fmt, **({"quality": 95} if fmt == "JPEG" else {}))
    return buf.getvalue()


def _truncated(seed=50) -> bytes:
    data = _image("PNG", seed)
    return data[: len(data) // 2]


NOT_AN_IMAGE = b"this is a text file, not an image"


def _pixels(data: bytes) -> np.ndarray:
    image = images.open_image(data, "t", "t")
    return images.fit(image, images.oriented_size(image), "t", "t")


def _records(out) -> dict:
    with open(os.path.join(out, prepare.MANIFEST)) as f:
        return {r["id"]: r for r in map(json.loads, f)}


def _stored(out, record, field="target") -> bytes:
    path = record[field] if field == "target" else record["inputs"][field]["path"]
    assert not os.path.isabs(path) and path.startswith("images/")
    with open(os.path.join(out, path), "rb") as f:
        return f.read()


# ----------------------------------------------------------------------------------------------------------
# The four inputs, each with its bad rows
# ----------------------------------------------------------------------------------------------------------


def _imagefolder(folder) -> dict:
    """An imagefolder of t2i rows; returns {row id: the image bytes} of the good rows."""
    os.makedirs(folder / "sub")
    files = {"a.png": _image("PNG", 1), "sub/b.jpg": _image("JPEG", 2), "c.webp": _image("WEBP", 3),
             "d.gif": _image("GIF", 4), "big.png": _image("PNG", 5, size=(64, 64)), "t.png": _truncated(),
             "n.png": NOT_AN_IMAGE, "e.png": b""}
    for name, data in files.items():
        (folder / name).write_bytes(data)
    (folder.parent / "outside.png").write_bytes(_image("PNG", 6))
    lines = [dict(file_name="a.png", text="a red square"),             # 1
             dict(file_name="sub/b.jpg", text="  a jpeg  ", extra=3),  # 2: stripped; other columns ignored
             dict(file_name="c.webp", text="a webp"),                  # 3
             dict(file_name="d.gif", text="a gif, re-encoded"),        # 4
             dict(file_name="a.png", text="a red square, again"),      # 5: the same image: stored once
             dict(file_name="gone.png", text="x"),                     # 6 missing_file
             dict(file_name="t.png", text="x"),                        # 7 corrupt_image (truncated PNG)
             dict(file_name="n.png", text="x"),                        # 8 corrupt_image (not an image)
             dict(file_name="e.png", text="x"),                        # 9 empty_image
             dict(file_name="a.png", text=""),                         # 10 invalid: empty caption
             dict(file_name="a.png"),                                  # 11 invalid: no caption
             "{not json",                                              # 12 unparsable
             dict(file_name="../outside.png", text="x"),               # 13 unsafe_path
             dict(file_name="big.png", text="x")]                      # 14 too_large (--max-image-pixels 2000)
    (folder / "metadata.jsonl").write_text("\n".join(x if isinstance(x, str) else json.dumps(x) for x in lines))
    return {f"metadata.jsonl:{n}": files[lines[n - 1]["file_name"]] for n in (1, 2, 3, 4, 5)}


IMAGEFOLDER_BAD = dict(missing_file=1, corrupt_image=2, empty_image=1, invalid=2, unparsable=1, unsafe_path=1,
                       too_large=1)


def _struct(data=None, path=None):
    return {"bytes": data, "path": path}


IMAGE = pa.struct([("bytes", pa.binary()), ("path", pa.string())])  # the datasets Image feature's storage


def _parquet_edit(folder) -> dict:
    """Two parquet files of editing rows (struct, raw binary and path cells); {row id: (source, target)}."""
    os.makedirs(folder / "files")
    files = {"s.png": _image("PNG", 20), "t.jpg": _image("JPEG", 21)}
    for name, data in files.items():
        (folder / "files" / name).write_bytes(data)
    rows = [  # (source struct, instruction, target bytes)
        (_struct(_image("PNG", 10)), "make it blue", _image("JPEG", 11)),            # 0
        (_struct(None, "files/s.png"), "a struct holding a path", _image("PNG", 12)),  # 1: relative to the file
        (_struct(_image("PNG", 13)), None, _image("PNG", 14)),                       # 2 invalid: no instruction
        (_struct(_truncated()), "x", _image("PNG", 15)),                             # 3 corrupt_image: the source
        (_struct(None, "files/gone.png"), "x", _image("PNG", 16)),                   # 4 missing_file
        (None, "x", _image("PNG", 17)),                                              # 5 invalid: no source
    ]
    pa.parquet.write_table(pa.table({"input_image": pa.array([r[0] for r in rows], IMAGE),
                                     "edit_prompt": pa.array([r[1] for r in rows], pa.string()),
                                     "edited_image": pa.array([r[2] for r in rows], pa.binary())}),
                           folder / "edit-0.parquet")
    pa.parquet.write_table(pa.table({"input_image": ["files/s.png"], "edit_prompt": ["path strings"],
                                     "edited_image": ["files/t.jpg"]}), folder / "edit-1.parquet")
    return {"edit-0.parquet:0": (rows[0][0]["bytes"], rows[0][2]), "edit-0.parquet:1": (files["s.png"], rows[1][2]),
            "edit-1.parquet:0": (files["s.png"], files["t.jpg"])}


PARQUET_BAD = dict(invalid=2, corrupt_image=1, missing_file=1)


def _save_to_disk(folder) -> dict:
    """A ``datasets.save_to_disk``-like folder (an Arrow IPC stream, state.json, dataset_info.json) of
    subject-driven rows: a source, a list of references, a prompt and a target; {row id: (source, refs, target)}."""
    os.makedirs(folder)
    rows = [
        (_image("PNG", 30), [_image("PNG", 31)], "put the subject in", _image("PNG", 32)),                # 0
        (_image("JPEG", 33), [_image("PNG", 34), _image("WEBP", 35)], "both subjects", _image("PNG", 36)),  # 1
        (_image("PNG", 37), [], "no subject", _image("PNG", 38)),                 # 2 invalid: no reference
        (_image("PNG", 39), [NOT_AN_IMAGE], "x", _image("PNG", 40)),              # 3 corrupt_image
        (_image("PNG", 41), [_image("PNG", 42)] * 3, "x", _image("PNG", 43)),     # 4 too_many_references
        (_image("PNG", 44), [_image("PNG", 45)], "x", b""),                        # 5 empty_image
    ]
    table = pa.table({
        "source": pa.array([_struct(r[0], "src.png") for r in rows], IMAGE),
        "subjects": pa.array([[_struct(x) for x in r[1]] for r in rows], pa.list_(IMAGE)),
        "prompt": pa.array([r[2] for r in rows]),
        "target": pa.array([_struct(r[3]) for r in rows], IMAGE),
    })
    name = "data-00000-of-00001.arrow"
    with pa.OSFile(str(folder / name), "wb") as sink, pa.ipc.new_stream(sink, table.schema) as writer:
        for batch in table.to_batches(max_chunksize=4):  # two record batches
            writer.write_batch(batch)
    (folder / "state.json").write_text(json.dumps({"_data_files": [{"filename": name}], "_split": "train"}))
    (folder / "dataset_info.json").write_text(json.dumps({"features": {}}))
    return {f"{name}:{i}": (rows[i][0], rows[i][1], rows[i][3]) for i in (0, 1)}


SAVE_TO_DISK_BAD = dict(invalid=1, corrupt_image=1, too_many_references=1, empty_image=1)


def _tar(path, members) -> None:
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def _webdataset(folder) -> dict:
    """Two webdataset shards, the second cut short; {row id: image bytes} of the good samples."""
    os.makedirs(folder)
    good = {"000": _image("JPEG", 60), "001": _image("PNG", 61), "002": _image("WEBP", 62)}
    _tar(folder / "shard-000.tar", [
        ("000.jpg", good["000"]), ("000.txt", b"a jpeg sample"), ("000.cls", b"3"),
        ("001.png", good["001"]), ("001.json", json.dumps({"caption": "from json"}).encode()),
        ("./002.webp", good["002"]), ("./002.txt", "caf\u00e9 au lait".encode()),
        ("003.txt", b"no image"),                                          # missing_file
        ("004.png", _truncated()), ("004.txt", b"truncated"),              # corrupt_image
        ("005.jpg", _image("JPEG", 63)), ("005.txt", b"   "),              # invalid: empty caption
        ("006.png", _image("PNG", 64)), ("006.json", b'{"other": 1}'),     # invalid: no caption field
    ])
    _tar(folder / "shard-001.tar", [("100.png", _image("PNG", 65)), ("100.txt", b"before the damage"),
                                    ("101.png", _image("PNG", 66)), ("101.txt", b"cut")])
    with tarfile.open(folder / "shard-001.tar") as tar:
        cut = tar.getmember("101.png").offset_data + 100
    data = (folder / "shard-001.tar").read_bytes()
    (folder / "shard-001.tar").write_bytes(data[:cut])  # inside 101.png: a damaged shard
    good = {f"shard-000.tar:{k}": v for k, v in good.items()}
    good["shard-001.tar:100"] = _image("PNG", 65)
    return good


WEBDATASET_BAD = dict(missing_file=1, corrupt_image=1, invalid=2, unparsable=1)


# ----------------------------------------------------------------------------------------------------------
# Each format
# ----------------------------------------------------------------------------------------------------------


def _summary_matches_file(summary, out):
    with open(os.path.join(out, prepare.SUMMARY)) as f:
        saved = json.load(f)
    assert saved["skipped"] == dict(summary.skipped) and saved["records"] == summary.records == len(_records(out))
    assert saved["rows"] == summary.rows


def _validates(out, tasks):
    lines = manifest_tool.main(["--validate", os.path.join(out, prepare.MANIFEST), "--workers", "2"])
    assert lines == [f"{sum(tasks.values())} good records: {tasks}"], lines


def test_imagefolder(tmp_path, capsys):
    good = _imagefolder(tmp_path / "folder")
    out = tmp_path / "out"
    summary = prepare.main(["--input", str(tmp_path / "folder"), "--out", str(out), "--max-image-pixels", "2000",
                            "--workers", "2"])
    assert dict(summary.skipped) == IMAGEFOLDER_BAD, summary.examples
    assert summary.rows == 14 and summary.records == 5 and dict(summary.tasks) == {"t2i": 5}
    records = _records(out)
    assert sorted(records) == sorted(good)
    assert records["metadata.jsonl:2"]["prompt"] == "a jpeg" and records["metadata.jsonl:1"]["prompt"] == "a red square"
    for rid in ("metadata.jsonl:1", "metadata.jsonl:2", "metadata.jsonl:3", "metadata.jsonl:5"):
        assert _stored(out, records[rid]) == good[rid], rid  # PNG, JPEG, WebP: the original bytes
        assert records[rid]["task"] == "t2i" and "inputs" not in records[rid]
    gif = records["metadata.jsonl:4"]
    assert gif["target"].endswith(".png") and _stored(out, gif) != good["metadata.jsonl:4"]
    np.testing.assert_array_equal(_pixels(_stored(out, gif)), _pixels(good["metadata.jsonl:4"]))
    assert records["metadata.jsonl:5"]["target"] == records["metadata.jsonl:1"]["target"]  # stored once
    assert (summary.images_stored, summary.images_reused, summary.images_reencoded) == (4, 1, 1)
    stored = [os.path.join(d, n) for d, _, names in os.walk(out / "images") for n in names]
    assert len(stored) == 4 and not any(".tmp" in p for p in stored)
    _summary_matches_file(summary, out)
    printed = capsys.readouterr().out
    assert f"5 records of 14 rows -> {out / prepare.MANIFEST}" in printed
    assert "skipped 1 x missing_file, e.g. record 'metadata.jsonl:6', field 'file_name'" in printed
    assert "skipped 2 x corrupt_image" in printed and "2,000-pixel limit" in printed
    _validates(out, {"t2i": 5})


def test_parquet_editing(tmp_path):
    good = _parquet_edit(tmp_path / "pq")
    out = tmp_path / "out"
    summary = prepare.main(["--input", str(tmp_path / "pq"), "--out", str(out), "--source-column", "input_image",
                            "--prompt-column", "edit_prompt", "--target-column", "edited_image", "--workers", "0"])
    assert dict(summary.skipped) == PARQUET_BAD, summary.examples
    assert "'edit-0.parquet:2', field 'prompt'" in summary.examples["invalid"]
    assert "'input_image'" in summary.examples["corrupt_image"]
    records = _records(out)
    assert sorted(records) == sorted(good)
    for rid, (source, target) in good.items():
        record = records[rid]
        assert record["task"] == "edit" and [i["role"] for i in record["inputs"]] == ["source"]
        assert _stored(out, record, 0) == source and _stored(out, record) == target, rid
    assert records["edit-0.parquet:0"]["prompt"] == "make it blue"
    _summary_matches_file(summary, out)
    _validates(out, {"edit": 3})


def test_save_to_disk_subjects_and_arrayrecord(tmp_path, capsys):
    good = _save_to_disk(tmp_path / "hf")
    out = tmp_path / "out"
    summary = prepare.main(["--input", str(tmp_path / "hf"), "--out", str(out), "--source-column", "source",
                            "--reference-columns", "subjects", "--prompt-column", "prompt", "--target-column",
                            "target", "--max-references", "2", "--arrayrecord", "--records-per-shard", "1"])
    assert dict(summary.skipped) == SAVE_TO_DISK_BAD, summary.examples
    assert "'subjects'" in summary.examples["invalid"] and "'subjects[0]'" not in summary.examples["invalid"]
    records = _records(out)
    assert sorted(records) == sorted(good) and dict(summary.tasks) == {"subject_edit": 2}
    for rid, (source, refs, target) in good.items():
        record = records[rid]
        assert [i["role"] for i in record["inputs"]] == ["source"] + ["reference"] * len(refs)
        assert [_stored(out, record, k) for k in range(len(record["inputs"]))] == [source, *refs]
        assert _stored(out, record) == target
    assert records["data-00000-of-00001.arrow:1"]["inputs"][2]["path"].endswith(".webp")
    assert "2 records in 2 ArrayRecord shards" in capsys.readouterr().out
    m = manifest.open_manifest(str(out / prepare.ARRAYRECORD))
    assert len(m) == 2 and {m[i].id for i in range(2)} == set(good)
    assert not os.path.exists(out / (prepare.ARRAYRECORD + ".tmp"))


def test_reference_columns_give_custom_and_multi(tmp_path):
    """Reference columns without a source: one reference is custom, two are multi (the task follows the images)."""
    os.makedirs(tmp_path / "pq")
    refs = [[_struct(_image("PNG", 70))], [_struct(_image("PNG", 71)), _struct(_image("PNG", 72))]]
    table = pa.table({"subject": pa.array(refs, pa.list_(IMAGE)), "second": pa.array([None, _struct(_image("PNG", 73))],
                                                                                     IMAGE),
                      "text": ["one", "two"], "image": pa.array([_struct(_image("PNG", 74))] * 2, IMAGE)})
    pa.parquet.write_table(table, tmp_path / "pq" / "refs.parquet")
    out = tmp_path / "out"
    summary = prepare.main(["--input", str(tmp_path / "pq" / "refs.parquet"), "--out", str(out),
                            "--reference-columns", "subject"])
    assert dict(summary.tasks) == {"custom": 1, "multi": 1} and not summary.skipped
    records = _records(out)
    assert len(records["refs.parquet:1"]["inputs"]) == 2
    assert summary.images_reused == 1  # one target, two rows
    summary = prepare.main(["--input", str(tmp_path / "pq"), "--out", str(out), "--overwrite",
                            "--reference-columns", "subject,second"])
    assert dict(summary.tasks) == {"multi": 1} and dict(summary.skipped) == {"invalid": 1}
    assert "'second'" in summary.examples["invalid"]
    assert len(_records(out)["refs.parquet:1"]["inputs"]) == 3


def test_image_paths_start_at_image_root_and_stay_inside_it(tmp_path):
    os.makedirs(tmp_path / "tables")
    os.makedirs(tmp_path / "pics")
    (tmp_path / "pics" / "a.png").write_bytes(_image("PNG", 90))
    pa.parquet.write_table(pa.table({"text": ["inside", "absolute", "climbs"],
                                     "image": ["a.png", str(tmp_path / "pics" / "a.png"), "../tables/x.png"]}),
                           tmp_path / "tables" / "t.parquet")
    out = tmp_path / "out"
    summary = prepare.main(["--input", str(tmp_path / "tables"), "--out", str(out), "--image-root",
                            str(tmp_path / "pics")])
    assert summary.records == 1 and dict(summary.skipped) == {"unsafe_path": 2}, summary.examples
    assert _stored(out, _records(out)["t.parquet:0"]) == (tmp_path / "pics" / "a.png").read_bytes()


def test_webdataset(tmp_path):
    good = _webdataset(tmp_path / "wds")
    out = tmp_path / "out"
    summary = prepare.main(["--input", str(tmp_path / "wds" / "*.tar"), "--out", str(out), "--prompt-column",
                            "caption"])
    assert dict(summary.skipped) == WEBDATASET_BAD, summary.examples
    assert "damaged tar" in summary.examples["unparsable"] and "003" in summary.examples["missing_file"]
    records = _records(out)
    assert sorted(records) == sorted(good)
    for rid, data in good.items():
        assert _stored(out, records[rid]) == data
    assert records["shard-000.tar:001"]["prompt"] == "from json"
    assert records["shard-000.tar:002"]["prompt"] == "caf\u00e9 au lait"
    assert records["shard-000.tar:000"]["target"].endswith(".jpg")
    _validates(out, {"t2i": 4})


# ----------------------------------------------------------------------------------------------------------
# The writer, the command
# ----------------------------------------------------------------------------------------------------------


def test_a_crash_leaves_no_manifest_and_the_old_one_untouched(tmp_path):
    (tmp_path / "a.png").write_bytes(_image("PNG", 80))
    out = tmp_path / "out"
    os.makedirs(out)
    (out / prepare.MANIFEST).write_text("the previous manifest\n")

    def rows():
        for i in range(3):
            yield ingest.Row(f"r{i}", "a prompt", (("target", "file_name", "a.png"),), str(tmp_path))
        raise KeyboardInterrupt  # the run stops half way

    with pytest.raises(KeyboardInterrupt):
        ingest.write_manifest(rows(), str(out), workers=0)
    assert (out / prepare.MANIFEST).read_text() == "the previous manifest\n"
    assert sorted(os.listdir(out)) == [prepare.IMAGES, prepare.MANIFEST]  # the image of r0, no .tmp, no summary


def test_limit_and_progress(tmp_path):
    good = _imagefolder(tmp_path / "folder")
    summary = prepare.main(["--input", str(tmp_path / "folder" / "metadata.jsonl"), "--out", str(tmp_path / "out"),
                            "--limit", "3", "--progress-every", "2"])
    assert summary.rows == 3 and summary.records == 3 and sorted(_records(tmp_path / "out")) == sorted(good)[:3]
    clock = iter([0.0, 1.0, 2.0, 3.0, 4.0, 15.0])
    lines = []
    progress = ingest.Progress("prepare", every=2, seconds=10.0, clock=lambda: next(clock), log=lines.append)
    assert [progress.update(n) for n in (1, 2, 3, 4, 5)] == [None, lines[0], None, lines[1], lines[2]]
    assert lines == ["prepare: 2 rows, 1.0 rows/s", "prepare: 4 rows, 1.0 rows/s", "prepare: 5 rows, 0.3 rows/s"]


@pytest.mark.parametrize("argv,problem", [
    ([], "give --input PATH"),
    (["--input", "nowhere"], "give --input PATH"),
    (["--input", "nowhere", "--out", "o"], "--input nowhere: no such file or folder"),
    (["--input", "folder", "--out", "o", "--source-column", "s"], "--source-column go with parquet or Arrow"),
    (["--input", "pq", "--out", "o", "--prompt-column", "caption"],
     r"edit-0.parquet has no columns 'caption', 'image'; its columns are input_image, edit_prompt, edited_image"),
    (["--input", "folder", "--out", "o", "--prompt-column", "caption"], r"no column 'caption'; its columns are "
     "file_name, text"),
    (["--input", "folder", "--out", "done"], "done already holds train.jsonl; give --overwrite"),
    (["--input", "dict", "--out", "o"], r"dict is a DatasetDict; give one split's folder \(test, train\)"),
    (["--input", "empty", "--out", "o"], "no metadata.jsonl, .parquet, .arrow or .tar files"),
    (["--input", "folder,pq", "--out", "o"], "mixes formats"),
])
def test_usage_errors(tmp_path, monkeypatch, argv, problem):
    monkeypatch.chdir(tmp_path)
    _imagefolder(tmp_path / "folder")
    _parquet_edit(tmp_path / "pq")
    os.makedirs(tmp_path / "done")
    (tmp_path / "done" / prepare.MANIFEST).write_text("")
    for split in ("train", "test"):
        os.makedirs(tmp_path / "dict" / split)
    (tmp_path / "dict" / "dataset_dict.json").write_text('{"splits": ["train", "test"]}')
    os.makedirs(tmp_path / "empty")
    with pytest.raises(app.UsageError, match=problem):
        prepare.main(argv)
    assert not os.path.exists(tmp_path / "o" / prepare.MANIFEST)


def test_without_pyarrow_the_error_says_how_to_install_it(tmp_path, monkeypatch):
    _parquet_edit(tmp_path / "pq")
    monkeypatch.setitem(sys.modules, "pyarrow", None)
    with pytest.raises(app.UsageError, match="pip install pyarrow"):
        prepare.main(["--input", str(tmp_path / "pq"), "--out", str(tmp_path / "o")])


def test_the_documented_records_are_valid_one_per_task():
    """docs/manifest.md's example records: each parses, one per task of the vocabulary."""
    from qk_jax.data.tasks import TASKS

    with open(os.path.join(ROOT, "docs", "manifest.md")) as f:
        lines = [line for line in f if line.startswith('{"')]
    records = [manifest.parse_record(json.loads(line), record_id=f"doc:{i}", max_references=2)
               for i, line in enumerate(lines)]
    assert [r.task for r in records] == list(TASKS)


# ----------------------------------------------------------------------------------------------------------
# Prepared manifests train
# ----------------------------------------------------------------------------------------------------------


def _train(argv, monkeypatch):
    """``python -m qk_jax.train`` in this process; ml_collections finds ``--config.x=...`` overrides in sys.argv."""
    from qk_jax import train
    from qk_jax.training import metrics

    monkeypatch.chdir(ROOT)
    monkeypatch.setattr(sys, "argv", ["qk_jax.train", *argv])
    workdir = argv[argv.index("--workdir") + 1]
    train.main(argv)
    logged = metrics.read_jsonl(os.path.join(workdir, metrics.JSONL))
    assert sorted(logged) == [1, 2] and all(np.isfinite(logged[s]["loss"]) for s in logged), logged
    assert os.path.isdir(os.path.join(workdir, "final"))


def _merge(out, name):
    """Appends ``out/name/train.jsonl`` to ``out/train.jsonl``, its paths relative to ``out``: one manifest of all."""
    with open(out / name / prepare.MANIFEST) as f, open(out / prepare.MANIFEST, "a") as g:
        for line in f:
            record = json.loads(line)
            record["target"] = f"{name}/{record['target']}"
            for inp in record.get("inputs", []):
                inp["path"] = f"{name}/{inp['path']}"
            g.write(json.dumps(record) + "\n")


def test_every_format_prepared_trains_stage3(tmp_path, monkeypatch, random_stage3_checkpoint):
    """Each format's manifest, merged into one: stage 3 (which takes t2i, edit and subject_edit records) trains on
    it; one run for the four, the suite's time being what it is."""
    _imagefolder(tmp_path / "folder")
    _webdataset(tmp_path / "wds")
    _save_to_disk(tmp_path / "hf")
    _parquet_edit(tmp_path / "pq")
    out = tmp_path / "out"
    prepare.main(["--input", str(tmp_path / "pq"), "--out", str(out), "--source-column", "input_image",
                  "--prompt-column", "edit_prompt", "--target-column", "edited_image"])
    prepare.main(["--input", str(tmp_path / "folder"), "--out", str(out / "folder"), "--max-image-pixels", "2000"])
    prepare.main(["--input", str(tmp_path / "wds"), "--out", str(out / "wds"), "--prompt-column", "caption"])
    prepare.main(["--input", str(tmp_path / "hf"), "--out", str(out / "subjects"), "--source-column", "source",
                  "--reference-columns", "subjects", "--prompt-column", "prompt", "--target-column", "target",
                  "--max-references", "2"])  # the tiny config's
    for name in ("folder", "wds", "subjects"):
        _merge(out, name)
    _validates(out, {"edit": 3, "t2i": 9, "subject_edit": 2})
    shutil.copytree(random_stage3_checkpoint, tmp_path / "stage2" / "final")  # a stage 3 may start from a stage 3
    _train(["--config", "configs/stage3.py:tiny", "--config.total_steps=2", f"--config.init_from={tmp_path / 'stage2'}",
            f"--config.data.manifest={out / prepare.MANIFEST}", "--workdir", str(tmp_path / "run")], monkeypatch)
