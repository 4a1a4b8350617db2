"""Checkpoint folder I/O: sharded round trip, pickle refusal, errors that name the tensor."""

import ml_dtypes
import numpy as np
import pytest

from qk_jax.convert.safetensors_io import CheckpointError, SafetensorsReader, read_config, write_safetensors


def test_sharded_round_trip_keeps_values_and_dtypes(tmp_path):
    rng = np.random.default_rng(0)
    tensors = {f"layer.{i}.weight": rng.standard_normal((8, 8)).astype(np.float32) for i in range(5)}
    tensors["emb"] = rng.standard_normal((4, 3)).astype(ml_dtypes.bfloat16)
    paths = write_safetensors(iter(tensors.items()), tmp_path, "model", max_shard_bytes=600)
    assert len(paths) > 1 and (tmp_path / "model.safetensors.index.json").is_file()
    reader = SafetensorsReader(tmp_path, "model")
    assert reader.keys() == sorted(tensors)
    for name, value in tensors.items():
        got = reader.get(name, value.shape)
        assert got.dtype == value.dtype
        np.testing.assert_array_equal(got, value)


def test_errors_name_the_file_or_tensor(tmp_path):
    write_safetensors({"a": np.zeros((2, 3), np.float32)}, tmp_path, "diffusion_pytorch_model")
    reader = SafetensorsReader(tmp_path, "diffusion_pytorch_model")
    with pytest.raises(CheckpointError, match=r"'a' has shape \(2, 3\) but the model expects \(3, 2\)"):
        reader.get("a", (3, 2))
    with pytest.raises(CheckpointError, match="'b' is missing"):
        reader.get("b")
    with pytest.raises(CheckpointError, match="no config.json"):
        read_config(tmp_path)


def test_pickle_checkpoints_are_refused(tmp_path):
    (tmp_path / "pytorch_model.bin").write_bytes(b"\x80\x04not really a pickle")
    with pytest.raises(CheckpointError, match="safetensors only.*save_pretrained"):
        SafetensorsReader(tmp_path, "model")


@pytest.mark.parametrize("shard", ["../outside.safetensors", "/etc/passwd", "sub/model.safetensors"])
def test_an_index_may_name_only_shards_of_its_own_folder(tmp_path, shard):
    import json

    folder = tmp_path / "model"
    write_safetensors({"a": np.zeros((2,), np.float32), "b": np.ones((2,), np.float32)}, folder, "model",
                      max_shard_bytes=4)
    index = folder / "model.safetensors.index.json"
    document = json.loads(index.read_text())
    document["weight_map"]["a"] = shard
    index.write_text(json.dumps(document))
    with pytest.raises(CheckpointError, match=r"tensor 'a' points at .*, outside"):
        SafetensorsReader(folder, "model")


def test_unparsable_json_names_its_file(tmp_path):
    (tmp_path / "config.json").write_text('{"hidden_size": 4,')
    with pytest.raises(CheckpointError, match=r"config.json: not valid JSON"):
        read_config(tmp_path)


def test_what_is_not_a_local_folder_says_how_to_get_one(tmp_path):
    """A Hub id, a single-file checkpoint or a folder without config.json: the layout expected and the way to it
    (nothing is downloaded)."""
    from qk_jax.convert.safetensors_io import CheckpointError, read_config

    with pytest.raises(CheckpointError, match="looks like a Hugging Face Hub id.*huggingface-cli download "
                                              "Qwen/Qwen2.5-VL-7B-Instruct --local-dir DIR"):
        read_config("Qwen/Qwen2.5-VL-7B-Instruct")
    single = tmp_path / "flux1-dev.safetensors"
    single.write_bytes(b"")
    with pytest.raises(CheckpointError, match="a single file.*from_single_file"):
        read_config(single)
    with pytest.raises(CheckpointError, match="no config.json; expected a local save_pretrained"):
        read_config(tmp_path)
    with pytest.raises(CheckpointError, match="no such folder; expected"):
        read_config(tmp_path / "missing")


def test_reading_and_writing_log_progress(tmp_path, monkeypatch):
    # A line per tensor once the 10 s interval is 0: how many tensors of the folder, and the bytes so far;
    # writing logs one line per shard.
    from qk_jax.convert import safetensors_io
    from qk_jax.data.ingest import Progress

    lines, written = [], []
    monkeypatch.setattr(safetensors_io, "Progress", lambda *a, **k: Progress(*a, **{**k, "seconds": 0.0},
                                                                            log=lines.append))
    monkeypatch.setattr(safetensors_io.logging, "info", lambda fmt, *args: written.append(fmt % args))
    tensors = {f"t{i}": np.ones((256, 256), np.float32) for i in range(3)}  # 256 KiB each
    write_safetensors(tensors, tmp_path, "model", max_shard_bytes=300 * 1024)
    assert len(written) == 3 and "model-00002-of-00003.safetensors (2 of 3, 0.3 MB)" in written[1]
    reader = SafetensorsReader(tmp_path, "model")
    reader.get("t0"), reader.get("t2")
    assert lines[-1].startswith(f"reading {tmp_path}: 2 tensors, of 3 (0.5 MB)")
