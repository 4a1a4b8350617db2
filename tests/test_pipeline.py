"""The per-stage pipeline: uniform bucketed batches, exact resume, bad records skipped and counted, CFG dropout
and task routing, and the stand-in processor against transformers' Qwen2-VL image processor."""

import io
import json
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from configs import stage1, stage3
from qk_jax.data import buckets, manifest, pipeline, processors
from qk_jax.ops import rope

ROLES_BY_TASK = {  # (sources, references, vlm) per task, 0-3 inputs
    "t2i": (0, 0, 0), "recon": (0, 0, 1), "transform": (0, 0, 1), "edit": (1, 0, 0), "custom": (0, 1, 0),
    "multi": (0, 2, 0), "subject_edit": (1, 2, 0),
}


def _config(module=stage3, **data):
    config = module.get_config("tiny")
    config.vlm.max_text_tokens = 160  # the byte-level stand-in tokenizer spends one token per character
    config.data.update(data)
    return config


def _png(image):
    out = io.BytesIO()
    Image.fromarray(image).save(out, format="PNG")
    return out.getvalue()


def _jpeg(image, exif_orientation=None):
    out = io.BytesIO()
    kwargs = {}
    if exif_orientation:
        exif = Image.Exif()
        exif[0x0112] = exif_orientation
        kwargs["exif"] = exif.tobytes()
    Image.fromarray(image).save(out, format="JPEG", quality=90, **kwargs)
    return out.getvalue()


def _bomb_png():
    """A valid PNG whose header claims 30000 x 30000 pixels: over twice Pillow's pixel limit."""
    data = bytearray(_png(np.zeros((1, 1, 3), np.uint8)))
    ihdr = data.index(b"IHDR")
    data[ihdr + 4 : ihdr + 12] = struct.pack(">II", 30000, 30000)
    data[ihdr + 17 : ihdr + 21] = struct.pack(">I", zlib.crc32(bytes(data[ihdr : ihdr + 17])))
    return bytes(data)


def _mixed_dataset(root, num=42, seed=0, bad_per_kind=0):
    """A manifest of every task with random image sizes and 0-3 inputs; optionally bad rows of every kind.

    Returns (manifest path, {line number: (target (w, h), task)} of the good rows, {kind: expected count}).
    """
    rng = np.random.default_rng(seed)
    (root / "img").mkdir(parents=True, exist_ok=True)
    rows, sizes = [], {}

    def image(name):
        w, h = (int(v) for v in rng.integers(12, 80, size=2))
        pixels = rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)
        data = _png(pixels) if rng.integers(2) else _jpeg(pixels)
        (root / "img" / name).write_bytes(data)
        return f"img/{name}", (w, h)

    tasks = list(ROLES_BY_TASK)
    for i in range(num):
        task = tasks[i % len(tasks)]
        target, size = image(f"{i}.img")
        sources, refs, vlm = ROLES_BY_TASK[task]
        roles = ["source"] * sources + ["reference"] * refs + ["vlm"] * vlm
        inputs = [dict(path=image(f"{i}_{k}.img")[0], role=role) for k, role in enumerate(roles)]
        prompt = f"do {task} {i}" + (" with <image 1>" if inputs and i % 2 else "")
        rows.append(json.dumps(dict(id=f"r{i}", task=task, prompt=prompt, target=target, inputs=inputs)))
        sizes[i] = (size, task)
    expected = {}
    if bad_per_kind:
        good = np.zeros((32, 48, 3), np.uint8)
        (root / "img" / "ok.png").write_bytes(_png(good))
        big = rng.integers(0, 256, size=(64, 64, 3), dtype=np.uint8)
        files = {
            "missing_file": None,
            "empty_image": b"",
            "corrupt_image": rng.bytes(300),
            "truncated": _jpeg(big)[:700],
            "too_large": _bomb_png(),
        }
        bad_rows = []
        for kind, data in files.items():
            for j in range(bad_per_kind):
                name = f"bad_{kind}_{j}.img"
                if data is not None:
                    (root / "img" / name).write_bytes(data)
                # The bad file is the target or an input, in turn.
                if j % 2:
                    row = dict(id=f"{kind}{j}", task="edit", prompt="p", target="img/ok.png",
                               inputs=[dict(path=f"img/{name}", role="source")])
                else:
                    row = dict(id=f"{kind}{j}", task="t2i", prompt="p", target=f"img/{name}")
                bad_rows.append(json.dumps(row))
        expected = dict(missing_file=bad_per_kind, empty_image=bad_per_kind, corrupt_image=2 * bad_per_kind,
                        too_large=bad_per_kind, unparsable=bad_per_kind, unknown_task=bad_per_kind,
                        too_many_references=bad_per_kind)
        refs = [dict(path="img/ok.png", role="reference")] * 3
        for j in range(bad_per_kind):
            bad_rows.append('{"id": "cut' + str(j) + '", "task": ')
            bad_rows.append(json.dumps(dict(id=f"task{j}", task="paint", prompt="p", target="img/ok.png")))
            bad_rows.append(json.dumps(dict(id=f"refs{j}", task="custom", prompt="p", target="img/ok.png",
                                            inputs=refs)))
        order = rng.permutation(len(rows) + len(bad_rows))
        merged = [None] * len(order)
        goods = {}
        for pos, src in zip(order, range(len(order))):
            if src < len(rows):
                merged[pos] = rows[src]
                goods[int(pos)] = sizes[src]
            else:
                merged[pos] = bad_rows[src - len(rows)]
        rows, sizes = merged, goods
    path = root / "manifest.jsonl"
    path.write_text("\n".join(rows) + "\n")
    return str(path), sizes, expected


def _records(batches):
    return sorted(int(i) for b in batches for i in b["record_index"][b["valid"]])


def test_every_batch_is_one_bucket_and_one_input_count(tmp_path):
    path, sizes, _ = _mixed_dataset(tmp_path)
    config = _config()
    config.cfg_dropout.text = config.cfg_dropout.image = 0.0
    config.tasks = {t: 1.0 for t in ROLES_BY_TASK}
    pipe = pipeline.make_pipeline(config, manifest=path, num_epochs=1, batch_size=4)
    bucket_sizes = buckets.Buckets.from_config(config.data)
    batches = list(pipe)
    assert _records(batches) == sorted(sizes)  # every record once
    seen_keys = set()
    for b in batches:
        size, m = b["target"].shape[1:3], b["roles"].shape[1]
        seen_keys.add((size, m))
        assert b["inputs"].shape == (4, m) + size + (3,) and b["pixel_values"].shape[:2] == (4, m)
        assert b["input_ids"].shape == b["attention_mask"].shape == (4, 160)
        assert b["target"].dtype == np.float32 and -1 <= b["target"].min() and b["target"].max() <= 1
        for row in np.flatnonzero(b["valid"]):
            i = int(b["record_index"][row])
            w, h = sizes[i][0]
            assert bucket_sizes.sizes[bucket_sizes.assign(w, h)] == (size[1], size[0])  # nearest ratio
            task = manifest.TASKS[b["task"][row]]
            sources, refs, vlm = ROLES_BY_TASK[task]
            assert list(b["roles"][row]) == [rope.SOURCE] * sources + [rope.REFERENCE] * refs + [rope.NONE] * vlm
    b = next(b for b in batches if b["roles"].shape[1] == 3)
    h, w = b["target"].shape[1] // 8, b["target"].shape[2] // 8  # tiny: 4x down, 2x2 packing
    layout = rope.in_context_layout(h, w, b["roles"])  # what the model will call
    assert (np.asarray(layout.kind) == rope.KIND_SOURCE).sum() == 4 * h * w  # one source per subject_edit row
    assert len(seen_keys) >= 6 and {m for _, m in seen_keys} == {0, 1, 2, 3}


def test_resume_mid_epoch_gives_identical_batches(tmp_path):
    path, _, _ = _mixed_dataset(tmp_path, num=28)
    config = _config()  # the training stream: task mixture, endless, CFG dropout on

    def make():
        return pipeline.make_pipeline(config, manifest=path, batch_size=2)

    it = iter(make())
    for _ in range(5):
        next(it)
    state = json.loads(json.dumps(it.get_state()))
    expected = [next(it) for _ in range(8)]
    resumed = iter(make())
    resumed.set_state(state)
    for want in expected:
        got = next(resumed)
        assert got.keys() == want.keys()
        for key in want:
            np.testing.assert_array_equal(got[key], want[key], err_msg=key)


def test_bad_rows_are_skipped_counted_and_good_ones_arrive_once(tmp_path, caplog):
    path, sizes, expected = _mixed_dataset(tmp_path, num=50, bad_per_kind=5)
    config = _config()  # stage 3: recon and transform rows are not its tasks
    pipe = pipeline.make_pipeline(config, manifest=path, num_epochs=1, batch_size=4)
    it = iter(pipe)
    batches = list(it)
    assert _records(batches) == sorted(i for i, (_, task) in sizes.items() if task in config.tasks)
    metrics = pipe.metrics(it)
    assert {k: v for k, v in metrics.items() if v} == expected
    # Logged once per kind, naming the record.
    for kind in ("missing_file", "empty_image", "corrupt_image", "too_large"):
        messages = [r.getMessage() for r in caplog.records if f"[{kind}]" in r.getMessage()]
        assert len(messages) == 1 and "record '" in messages[0]


def test_two_worker_prefetch_counts_and_resumes(tmp_path):
    path, sizes, expected = _mixed_dataset(tmp_path, num=24, bad_per_kind=2)
    config = _config()
    config.tasks = {t: 1.0 for t in ROLES_BY_TASK}

    def make(**kw):
        return pipeline.make_pipeline(config, manifest=path, batch_size=2, workers=2, **kw)

    pipe = make(num_epochs=1)
    it = iter(pipe)
    batches = list(it)
    assert _records(batches) == sorted(sizes)
    assert {k: v for k, v in pipe.metrics(it).items() if v} == expected
    it.close()

    it = iter(make())
    for _ in range(3):
        next(it)
    state = json.loads(json.dumps(it.get_state()))
    expected_batches = [next(it) for _ in range(4)]
    it.close()
    resumed = iter(make())
    resumed.set_state(state)
    for want in expected_batches:
        got = next(resumed)
        for key in want:
            np.testing.assert_array_equal(got[key], want[key], err_msg=key)
    resumed.close()


def test_guidance_dropout_and_stage_routing(tmp_path):
    path, _, _ = _mixed_dataset(tmp_path, num=21)
    tasks = {t: 1.0 for t in ROLES_BY_TASK}
    vlm = stage3.get_config("tiny").vlm
    vision_ids = [vlm.vision_start_token_id, vlm.vision_end_token_id, vlm.image_token_id]

    def batches(module, text, image):
        config = _config(module)
        config.cfg_dropout.text, config.cfg_dropout.image = text, image
        config.tasks = tasks
        return list(pipeline.make_pipeline(config, manifest=path, num_epochs=1, batch_size=3))

    # Stages 1-2: images reach the VLM only.
    for b in batches(stage1, 0.0, 0.0):
        assert "inputs" not in b and (b["roles"] == rope.NONE).all() and b["image_present"].all()
    # All images dropped: no slot role, no pixels, no image tokens; text kept.
    for b in batches(stage3, 0.0, 1.0):
        assert (b["roles"] == rope.NONE).all() and not b["image_present"].any()
        assert not b["pixel_values"].any() and not b["inputs"].any()
        assert b["images_dropped"].all() == (b["roles"].shape[1] > 0) and not b["text_dropped"].any()
        assert not np.isin(b["input_ids"], vision_ids).any()
    # Text dropped, images kept: the prompt is just the images' tokens.
    for b in batches(stage3, 1.0, 0.0):
        assert b["text_dropped"].all() and b["image_present"].all()
        merged = b["image_grid_thw"].prod(-1) // 4  # 2x2 patches merge into one token
        assert (b["attention_mask"].sum(1) == (merged + 2).sum(1)).all()  # + vision start/end per image
        assert (np.isin(b["input_ids"], vision_ids) | (b["attention_mask"] == 0)).all()


def test_dropout_is_deterministic_for_a_seed(tmp_path):
    path, _, _ = _mixed_dataset(tmp_path, num=28)
    config = _config()
    config.cfg_dropout.text = config.cfg_dropout.image = 0.5

    def first(seed):
        it = iter(pipeline.make_pipeline(config, manifest=path, batch_size=2, seed=seed))
        return [next(it) for _ in range(6)]

    a, b, c = first(0), first(0), first(1)
    for x, y in zip(a, b):
        for key in x:
            np.testing.assert_array_equal(x[key], y[key])
    flags = np.concatenate([x["text_dropped"] for x in a] + [x["images_dropped"] for x in a])
    assert 0 < flags.mean() < 1
    assert any(not np.array_equal(x["record_index"], y["record_index"]) for x, y in zip(a, c))


def test_task_mixture_follows_the_config_weights(tmp_path):
    path, _, _ = _mixed_dataset(tmp_path, num=35)
    config = _config()
    it = iter(pipeline.make_pipeline(config, manifest=path, batch_size=4))
    counts = np.zeros(len(manifest.TASKS))
    for _ in range(60):
        b = next(it)
        np.add.at(counts, b["task"][b["valid"]], 1)
    weights = np.zeros(len(manifest.TASKS))
    for task, w in config.tasks.items():
        weights[manifest.TASKS.index(task)] = w
    np.testing.assert_allclose(counts / counts.sum(), weights / weights.sum(), atol=0.04)


def test_pixels_orientation_and_bucket_crop(tmp_path):
    exact = np.random.default_rng(0).integers(0, 256, size=(32, 32, 3), dtype=np.uint8)
    (tmp_path / "exact.png").write_bytes(_png(exact))
    wide = np.zeros((24, 48, 3), np.uint8)  # stored 48 wide x 24 high; EXIF 6 = rotate to 24 x 48
    wide[:, :24] = 255
    (tmp_path / "rotated.jpg").write_bytes(_jpeg(wide, exif_orientation=6))
    rows = [dict(id="exact", task="t2i", prompt="x", target="exact.png"),
            dict(id="rot", task="t2i", prompt="y", target="rotated.jpg")]
    (tmp_path / "m.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    config = _config()
    config.tasks = dict(t2i=1.0)
    batches = list(pipeline.make_pipeline(config, manifest=str(tmp_path / "m.jsonl"), num_epochs=1, batch_size=1))
    by_id = {int(b["record_index"][0]): b for b in batches}
    np.testing.assert_array_equal(by_id[0]["target"][0], exact / np.float32(127.5) - 1)
    rotated = by_id[1]["target"][0]
    assert rotated.shape[0] > rotated.shape[1]  # portrait bucket after orientation
    assert rotated[:4].mean() > 0.5 and rotated[-4:].mean() < -0.5  # the white half is on top after rotation


def test_byte_processor_matches_transformers_image_processor():
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import (
        Qwen2VLImageProcessorPil,
    )

    config = stage3.get_config("tiny")
    ours = processors.ByteProcessor.from_config(config.vlm)
    reference = Qwen2VLImageProcessorPil(patch_size=8, merge_size=2, temporal_patch_size=2,
                                         size={"shortest_edge": 16 * 16, "longest_edge": 128 * 128})
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, size=(32, 48, 3), dtype=np.uint8) for _ in range(2)]
    # The patches come in prompt order (image 2 first here): the order the VLM fills its image tokens.
    want = reference(images=images[::-1], return_tensors="np")
    got = ours("put <image 2> left of <image 1>", images)
    np.testing.assert_allclose(got["pixel_values"], want["pixel_values"], atol=1e-5)
    np.testing.assert_array_equal(got["image_grid_thw"], want["image_grid_thw"])
    ids = got["input_ids"]
    assert (ids == config.vlm.image_token_id).sum() == 2 * 2 * 3  # 4x6 patches, 2x2 merged, per image
    assert ids[:4].tolist() == [c % config.vlm.text.bos_token_id for c in b"put "]  # bytes wrap below specials


def test_missing_manifest_and_unknown_task_raise(tmp_path):
    with pytest.raises(ValueError, match="no manifest"):
        pipeline.make_pipeline(_config())
    path, _, _ = _mixed_dataset(tmp_path, num=7)
    config = _config()
    config.tasks = dict(paint=1.0)
    with pytest.raises(ValueError, match="unknown tasks"):
        pipeline.make_pipeline(config, manifest=path)
    config.tasks = dict(edit=1.0)
    (tmp_path / "only_t2i.jsonl").write_text(json.dumps(dict(task="t2i", prompt="p", target="img/0.img")))
    with pytest.raises(ValueError, match="no records of the stage's tasks"):
        pipeline.make_pipeline(config, manifest=str(tmp_path / "only_t2i.jsonl"))


def test_trim_text_cuts_shared_padding_to_a_multiple():
    mask = np.zeros((3, 40), np.int32)
    for row, length in enumerate((5, 17, 9)):
        mask[row, :length] = 1
    ids = np.where(mask, 7, 0).astype(np.int32)
    batch = pipeline.trim_text(dict(input_ids=ids.copy(), attention_mask=mask.copy(), target=np.zeros(2)), 8)
    assert batch["input_ids"].shape == batch["attention_mask"].shape == (3, 24)  # 17 -> 24
    np.testing.assert_array_equal(batch["attention_mask"], mask[:, :24])
    assert pipeline.trim_text(dict(input_ids=ids, attention_mask=mask), 0)["input_ids"].shape == (3, 40)
    assert pipeline.trim_text(dict(input_ids=ids, attention_mask=mask), 32)["input_ids"].shape == (3, 32)
    assert pipeline.trim_text(dict(input_ids=ids, attention_mask=mask), 64)["input_ids"].shape == (3, 40)


def test_text_multiple_trims_every_batch_and_refuses_multi_host(tmp_path):
    path, _, _ = _mixed_dataset(tmp_path, num=21)
    config = _config(text_multiple=16)
    lengths = set()
    for batch in pipeline.make_pipeline(config, manifest=path, num_epochs=1, batch_size=4):
        length = batch["input_ids"].shape[1]
        longest = max(int(batch["attention_mask"].sum(1).max()), 1)  # a row with text and images dropped is empty
        assert length % 16 == 0 and longest <= length < longest + 16, (length, longest)
        lengths.add(length)
    assert len(lengths) > 1 and max(lengths) < config.vlm.max_text_tokens
    with pytest.raises(ValueError, match="multi-host"):
        pipeline.make_pipeline(config, manifest=path, process_count=2, process_index=0)


def test_arrayrecord_shards_give_the_same_samples(tmp_path):
    path, sizes, _ = _mixed_dataset(tmp_path, num=21, bad_per_kind=1)
    index = manifest.to_arrayrecord(path, str(tmp_path / "ar"), records_per_shard=8, max_references=2)
    assert index["skipped"] == dict(missing_file=1, unparsable=1, unknown_task=1, too_many_references=1)
    config = _config()
    config.cfg_dropout.text = config.cfg_dropout.image = 0.0
    config.tasks = {t: 1.0 for t in ROLES_BY_TASK}

    def samples(source):
        pipe = pipeline.make_pipeline(config, manifest=source, num_epochs=1, batch_size=2)
        it = iter(pipe)
        rows = sorted(tuple(b[k][r].tobytes() for k in ("target", "input_ids", "roles"))
                      for b in it for r in np.flatnonzero(b["valid"]))
        return rows, pipe.metrics(it)

    from_jsonl, jsonl_metrics = samples(path)
    from_shards, shard_metrics = samples(str(tmp_path / "ar"))
    assert len(from_jsonl) == len(sizes) and from_shards == from_jsonl
    # Bad image bytes travel into the shards and are counted when decoded.
    assert {k: v for k, v in shard_metrics.items() if v} == dict(empty_image=1, corrupt_image=2, too_large=1)
    assert jsonl_metrics["corrupt_image"] == 2 and jsonl_metrics["missing_file"] == 1


def test_hosts_read_disjoint_shards(tmp_path):
    path, sizes, _ = _mixed_dataset(tmp_path, num=21)
    config = _config()
    config.tasks = {t: 1.0 for t in ROLES_BY_TASK}
    seen = [_records(pipeline.make_pipeline(config, manifest=path, num_epochs=1, batch_size=2, process_index=i,
                                            process_count=2)) for i in range(2)]
    assert not set(seen[0]) & set(seen[1]) and sorted(seen[0] + seen[1]) == sorted(sizes)


def test_malformed_arrayrecord_record_is_counted(tmp_path):
    from array_record.python import array_record_module

    image = _png(np.zeros((32, 32, 3), np.uint8))
    good = manifest.encode_record(manifest.Record(id="g", task="t2i", prompt="p", target=image))
    writer = array_record_module.ArrayRecordWriter(str(tmp_path / "s.array_record"), "group_size:1")
    for data in (good, b"\x00garbage", good):
        writer.write(data)
    writer.close()
    (tmp_path / "index.json").write_text(json.dumps(dict(shards=["s.array_record"], num_records=3,
                                                         tasks=dict(t2i=[0, 3]), skipped={})))
    config = _config()
    config.tasks = dict(t2i=1.0)
    pipe = pipeline.make_pipeline(config, manifest=str(tmp_path), num_epochs=1, batch_size=2)
    it = iter(pipe)
    assert _records(list(it)) == [0, 2]
    assert pipe.metrics(it)["unparsable"] == 1


def test_word_processor_reads_shapesworld_prompts_and_shares_the_image_side():
    from qk_jax.data import shapesworld

    config = stage3.get_config("shapes")
    words = processors.processor_from_config(config.vlm)
    assert isinstance(words, processors.WordProcessor)
    vocab = config.vlm.vocabulary
    ids = words.text_ids("Put the subject, from")
    assert ids == [vocab.index(w) + 1 for w in ("put", "the", "subject", ",", "from")]  # lower-cased, split
    assert words.text_ids("a pink circle") == [vocab.index("a") + 1, processors.UNKNOWN_WORD_ID,
                                              vocab.index("circle") + 1]
    assert words.unknown_words("a pink circle") == ["pink"]
    # Every ShapesWorld prompt: known words only, and it fits max_text_tokens with its images.
    world = shapesworld.World()
    image = np.zeros((64, 64, 3), np.uint8)
    longest = 0
    for i in range(70):
        task = shapesworld.TASKS[i % len(shapesworld.TASKS)]
        sample = shapesworld.generate_sample(world, i, task)
        n = len(sample["inputs"])
        text = " ".join(p for p in manifest.prompt_segments(sample["prompt"], n) if isinstance(p, str))
        assert words.unknown_words(text) == [], sample["prompt"]
        longest = max(longest, len(words(sample["prompt"], [image] * n)["input_ids"]))
    assert longest <= config.vlm.max_text_tokens
    # The image side is the byte processor's: same patches, same placeholders, only the text differs.
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, size=(64, 64, 3), dtype=np.uint8) for _ in range(2)]
    prompt = "put the subject from <image 2> at the top and <image 1>"
    got, ref = words(prompt, images), processors.ByteProcessor.from_config(config.vlm)(prompt, images)
    np.testing.assert_array_equal(got["pixel_values"], ref["pixel_values"])
    np.testing.assert_array_equal(got["image_grid_thw"], ref["image_grid_thw"])
    special = config.vlm.text.bos_token_id
    np.testing.assert_array_equal(got["input_ids"][got["input_ids"] >= special],
                                  ref["input_ids"][ref["input_ids"] >= special])
    assert got["input_ids"].max() < config.vlm.text.vocab_size


def test_processor_choice_and_vocabulary_errors():
    config = stage3.get_config("tiny")
    assert type(processors.processor_from_config(config.vlm)) is processors.ByteProcessor
    del config.vlm["tokenizer"]  # a checkpoint from before the key: bytes
    assert type(processors.processor_from_config(config.vlm)) is processors.ByteProcessor
    config.vlm.tokenizer = "word"
    assert type(processors.processor_from_config(config.vlm)) is processors.WordProcessor
    config.vlm.tokenizer = "sentencepiece"
    with pytest.raises(ValueError, match="config.vlm.tokenizer='sentencepiece'; expected one of byte, word"):
        processors.processor_from_config(config.vlm)
    kwargs = processors.PatchProcessor._kwargs(config.vlm)
    with pytest.raises(ValueError, match="repeats"):
        processors.WordProcessor(vocabulary=("a", "b", "a"), **kwargs)
    with pytest.raises(ValueError, match="not one lower-case word"):
        processors.WordProcessor(vocabulary=("top left",), **kwargs)
    with pytest.raises(ValueError, match="do not fit below the first special token id 96"):
        processors.WordProcessor(vocabulary=tuple(f"w{i}" for i in range(96)), **kwargs)
    paper = stage3.get_config()
    paper.vlm.tokenizer = "word"
    with pytest.raises(ValueError, match="needs config.vlm.vocabulary"):
        processors.processor_from_config(paper.vlm)


def test_abstract_batch_is_what_the_pipeline_yields():
    """The shapes ahead-of-time compilation uses (``pipeline.abstract_batch``) are those of real ShapesWorld
    batches of the same bucket and slot count: every model entry's shape and dtype and the static image grid
    (text no longer than the longest)."""
    from qk_jax.models.query_kontext import vlm_image_grid
    from qk_jax.training.loop import MODEL_KEYS, training_manifest

    for module in (stage1, stage3):
        config = module.get_config("tiny")
        stream = iter(pipeline.make_pipeline(config, manifest=training_manifest(config), batch_size=2))
        for _ in range(4):
            batch = next(stream)
            slots = batch["pixel_values"].shape[1] if "pixel_values" in batch else 0
            shapes, grid = pipeline.abstract_batch(config, 2, slots)
            real = {k: (np.shape(batch[k]), np.asarray(batch[k]).dtype) for k in MODEL_KEYS if k in batch}
            assert set(real) == set(shapes) and grid == vlm_image_grid(batch), (module.__name__, slots)
            for key, (shape, dtype) in shapes.items():
                text = key in ("input_ids", "attention_mask")
                assert real[key][1] == dtype and (real[key][0][:1] == shape[:1] and real[key][0][1] <= shape[1]
                                                  if text else real[key][0] == shape), (key, real[key], shape)


def test_every_process_reads_the_global_stream_for_a_manifest_unless_told():
    # Unset: a manifest's records bucket differently per process (aspect ratios, bad records), so every process
    # reads the whole stream; drawn ShapesWorld (one size, no bad records) reads per process. One process: never.
    rule = pipeline.reads_global_stream
    listed, shapes = dict(manifest="train.jsonl", global_stream=None), dict(manifest=None, global_stream=None)
    assert rule(listed, 2) and not rule(shapes, 2) and not rule(listed, 1)
    assert not rule(dict(listed, global_stream=False), 2) and rule(dict(shapes, global_stream=True), 4)
    assert rule(dict(stage3.get_config("tiny").data, manifest="x.jsonl"), 2)
    assert not rule(stage1.get_config("shapes").data, 2) and stage1.get_config().data.global_stream is None


def test_every_process_count_plans_the_same_global_batches_and_decodes_only_its_rows(tmp_path, monkeypatch):
    # Rows mode (data.decode_own_rows): the global stream is bucketed from the images' headers alone, so 1, 2 or 4
    # processes cut the same global batches; each decodes only its rows. A record whose header is bad is skipped
    # by all alike; one whose pixels fail (a truncated JPEG, a corrupt input) is a masked row, counted once.
    path, sizes, expected = _mixed_dataset(tmp_path, num=160, bad_per_kind=2)
    config = _config(decode_own_rows=True, aspect_ratios=[[1, 1], [1, 2], [2, 1]])  # few buckets: few partial batches
    config.tasks = {t: 1.0 for t in ROLES_BY_TASK}
    config.batch_size = 4
    decodes: list[str] = []
    sample = pipeline.MakeSample.sample
    monkeypatch.setattr(pipeline.MakeSample, "sample",
                        lambda self, record, *a: (decodes.append(record.id), sample(self, record, *a))[1])

    def run(process, processes):
        decodes.clear()
        pipe = pipeline.make_pipeline(config, manifest=path, num_epochs=1, process_index=process,
                                      process_count=processes)
        it = iter(pipe)
        batches = list(it)
        metrics = pipe.metrics(it)
        at_decode = dict(pipe.decoder.skipped)
        before = {k: v - at_decode.get(k, 0) for k, v in metrics.items()}  # the manifest's and the headers'
        return batches, metrics, list(decodes), at_decode, before

    one, one_metrics, one_decodes, one_at_decode, one_before = run(0, 1)
    assert {k: v for k, v in one_metrics.items() if v} == expected  # every bad record counted once
    assert _records(one) == sorted(sizes)  # every good record arrives once, as a valid row
    # The truncated JPEG targets (readable headers) and the bad inputs became masked rows.
    assert sum(one_at_decode.values()) >= 2 and sum(int((~b["valid"]).sum()) for b in one) >= 2
    for processes in (2, 4):
        parts = [run(p, processes) for p in range(processes)]
        for step, batch in enumerate(one):
            rows = [part[0][step] for part in parts]
            assert {k: np.concatenate([r[k] for r in rows]).shape for k in batch} == \
                   {k: v.shape for k, v in batch.items()}
            for key in batch:
                np.testing.assert_array_equal(np.concatenate([r[key] for r in rows]), batch[key], err_msg=key)
        assert all(len(part[0]) == len(one) for part in parts)
        # The decoding is split: each process decodes its rows, plus at most the record a partial batch is padded
        # with (once a batch) and stand-ins for rows that failed; reading it all would be `processes` times one's.
        decoded = [part[2] for part in parts]
        assert set().union(*decoded) == set(one_decodes)  # measured: 88 + 88 and 4 x 45-48 of one's 166
        assert all(len(d) <= len(one_decodes) / processes + len(one) for d in decoded), [len(d) for d in decoded]
        assert sum(map(len, decoded)) <= len(one_decodes) + (processes - 1) * (len(one) + 2 * len(expected))
        for part in parts:
            assert part[4] == one_before  # every process skips the same records before decoding
        # A row that fails to decode is counted by the process that owns it: once in all.
        kinds = set(one_at_decode) | {k for part in parts for k in part[3]}
        assert {k: sum(part[3].get(k, 0) for part in parts) for k in kinds} == \
               {k: one_at_decode.get(k, 0) for k in kinds}


def test_reading_mode_follows_the_two_switches():
    mode = pipeline.reading_mode
    listed, shapes = dict(manifest="train.jsonl", global_stream=None), dict(manifest=None, global_stream=None)
    assert mode(listed, 2) == "rows" and mode(shapes, 2) == "own" and mode(listed, 1) == "own"
    assert mode(dict(listed, decode_own_rows=False), 2) == "whole"
    assert mode(dict(shapes, global_stream=True), 4) == "rows" and mode(dict(shapes, decode_own_rows=True), 1) == "rows"
    assert mode(dict(listed, global_stream=False), 2) == "own"


def test_a_planned_batch_whose_every_row_fails_is_fed_blank_and_masked(tmp_path):
    # Headers that read, pixels that do not (truncated JPEGs): no row decodes, so every process feeds a blank
    # sample of the batch's shapes, all rows masked, rather than stopping the run or feeding another shape.
    rng = np.random.default_rng(0)
    (tmp_path / "img").mkdir()
    lines = []
    for i in range(4):
        (tmp_path / "img" / f"{i}.jpg").write_bytes(_jpeg(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8))[:700])
        lines.append(json.dumps(dict(id=f"r{i}", task="t2i", prompt=f"p {i}", target=f"img/{i}.jpg")))
    (tmp_path / "m.jsonl").write_text("\n".join(lines) + "\n")
    config = _config(decode_own_rows=True)
    config.tasks = {"t2i": 1.0}
    config.batch_size = 4
    pipe = pipeline.make_pipeline(config, manifest=str(tmp_path / "m.jsonl"), num_epochs=1, process_index=1,
                                  process_count=2)
    it = iter(pipe)
    (batch,) = list(it)
    side = config.data.resolution
    assert batch["target"].shape == (2, side, side, 3) and not batch["valid"].any()
    assert np.all(batch["target"] == -1.0)  # black
    assert pipe.metrics(it)["corrupt_image"] == 2  # this process's two rows
