"""The VLM processor with a tiny word-level tokenizer built here (Qwen's special tokens, nothing downloaded)."""

import dataclasses
import pickle

import numpy as np
import pytest
from PIL import Image

from configs import stage1
from qk_jax.data import qwen_processor as P
from qk_jax.models.qwen_vl import QwenVLConfig, check_inputs

WORDS = ["[UNK]", "a", "red", "circle", "put", "next", "to", "user", "assistant", "system", "You", "are", "helpful",
         "assistant."]
# Qwen's special tokens at their offsets from <|endoftext|> (151643 in Qwen's vocabulary, 96 in the tiny config's).
SPECIAL = {"<|endoftext|>": 0, "<|im_start|>": 1, "<|im_end|>": 2, "<|vision_start|>": 9, "<|vision_end|>": 10,
           "<|image_pad|>": 12, "<|video_pad|>": 13}
FIRST_SPECIAL = 96
MEAN, STD = np.array([0.48145466, 0.4578275, 0.40821073]), np.array([0.26862954, 0.26130258, 0.27577711])


@pytest.fixture(scope="module")
def tokenizer_folder(tmp_path_factory):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(WORDS)} | {t: FIRST_SPECIAL + o for t, o in SPECIAL.items()}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="<|endoftext|>",
                                   additional_special_tokens=list(SPECIAL)[1:])
    folder = tmp_path_factory.mktemp("tokenizer")
    fast.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def config():
    return QwenVLConfig.from_config(stage1.get_config("tiny").vlm)


@pytest.fixture(scope="module")
def proc(tokenizer_folder, config):
    return P.QwenVLProcessor.from_config(config, tokenizer_folder, min_pixels=16 * 16)


def image(h, w, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def unpatchify(patches, grid, patch, merge, temporal=2):
    """Inverse of the processor's patch layout: [t*h*w, C*T*p*p] -> [C, H, W] (first temporal copy)."""
    _, h, w = grid
    x = patches.reshape(h // merge, w // merge, merge, merge, 3, temporal, patch, patch)[..., 0, :, :]
    return x.transpose(4, 0, 2, 5, 1, 3, 6).reshape(3, h * patch, w * patch)


def test_images_become_pad_tokens_and_patches(proc, config):
    imgs = [image(48, 64), image(50, 30, 1)]
    batch = proc.batch(["put <image 2> next to <image 1>", "a red circle"], [imgs, []])
    grid = batch["image_grid_thw"]
    # smart_resize: sides to multiples of 16 px; images in token order (<image 2> comes first in the prompt).
    np.testing.assert_array_equal(grid, [[1, 6, 4], [1, 6, 8]])
    assert [proc.image_grid_thw(48, 64), proc.image_grid_thw(50, 30)] == [(1, 6, 8), (1, 6, 4)]
    ids, mask = batch["input_ids"], batch["attention_mask"]
    pad_id = proc.token_ids[P.IMAGE_PAD]
    assert (ids[0] == pad_id).sum() == (6 * 8 + 6 * 4) // 4 and (ids[1] == pad_id).sum() == 0
    assert mask[1, 0] == 0 and mask[:, -1].all()  # left padding
    assert batch["pixel_values"].shape == (6 * 8 + 6 * 4, config.vision.patch_dim)

    # Image 1's patches (second in token order) are the resized, CLIP-normalised image.
    resized = np.asarray(Image.fromarray(imgs[0]).resize((64, 48), Image.BICUBIC), np.float64) / 255
    want = ((resized - MEAN) / STD).transpose(2, 0, 1)
    got = unpatchify(batch["pixel_values"][24:], grid[1], config.vision.patch_size, 2)
    np.testing.assert_allclose(got, want, atol=1e-5)

    text = proc.tokenizer.convert_ids_to_tokens(ids[0][mask[0] == 1].tolist())
    assert text[:2] == ["<|im_start|>", "system"] and text[-2:] == ["<|im_start|>", "assistant"]
    first = text.index("<|vision_start|>")
    assert text[first - 1] == "put" and text[first + 1 + 6] == "<|vision_end|>"  # <image 2> (6 tokens) comes first
    assert text[first + 8: first + 10] == ["next", "to"]
    # Model-ready: the pad tokens match the image features.
    check_inputs(config, ids, tuple(map(tuple, grid)), batch["pixel_values"].shape)


def test_padding_length_and_budget(proc, config):
    small = dataclasses.replace(config, vision=dataclasses.replace(config.vision, max_pixels=64 * 64))
    small_proc = P.QwenVLProcessor.from_config(small, proc.tokenizer.name_or_path, min_pixels=16 * 16)
    batch = small_proc.batch(["a", "a red circle <image 1>"], [[], [image(300, 400)]], padding_side="right",
                             max_length=80)
    assert batch["input_ids"].shape == (2, 80) and batch["attention_mask"][0, 0] == 1
    assert batch["attention_mask"][0, -1] == 0 and batch["input_ids"][0, -1] == proc.pad_token_id
    grid = batch["image_grid_thw"]
    np.testing.assert_array_equal(grid, [[1, 6, 8]])  # 300x400 resized into the 64*64 px budget: 48x64
    check_inputs(small, batch["input_ids"], tuple(map(tuple, grid)), batch["pixel_values"].shape)
    no_chat = P.QwenVLProcessor.from_config(config, proc.tokenizer.name_or_path, chat=False).batch(["a red"])
    assert no_chat["input_ids"].shape == (1, 2) and no_chat["pixel_values"] is None
    toks = proc.tokenizer.convert_ids_to_tokens(proc("a", [image(16, 16)])["input_ids"].tolist())
    assert toks[toks.index("user") + 1] == "<|vision_start|>"  # an unplaced image goes first


def test_pipeline_protocol(proc):
    """What ``qk_jax.data.pipeline`` relies on: one unpadded sample, grids from sizes, and pickling."""
    out = proc("put <image 1> next to <image 2>", [image(32, 48), image(32, 48, 1)])
    grid = proc.image_grid_thw(32, 48)
    assert out["input_ids"].ndim == 1 and out["input_ids"].dtype == np.int32
    assert out["pixel_values"].shape == (2 * int(np.prod(grid)), proc.patch_dim)
    np.testing.assert_array_equal(out["image_grid_thw"], [grid, grid])
    assert proc("a")["pixel_values"].shape == (0, proc.patch_dim)
    clone = pickle.loads(pickle.dumps(proc))
    np.testing.assert_array_equal(clone("a <image 1>", [image(16, 16)])["input_ids"],
                                  proc("a <image 1>", [image(16, 16)])["input_ids"])


def test_errors(proc, config, tmp_path, monkeypatch):
    with pytest.raises(ValueError, match="there are 2 inputs, each placed once"):
        proc("put <image 1> next to <image 1>", [image(16, 16), image(16, 16)])
    with pytest.raises(ValueError, match="more than max_length=8"):
        proc.batch(["a red circle"], max_length=8)
    with pytest.raises(ValueError, match="tokenizes to 1 <.image_pad.> tokens but its images need 0"):
        proc("a <|image_pad|>")
    with pytest.raises(ValueError, match="HxWx3 uint8"):
        proc("<image 1>", [np.zeros((8, 8), np.uint8)])
    with pytest.raises(ValueError, match="one list per prompt"):
        proc.batch(["a", "b"], [[]])
    with pytest.raises(ValueError, match="disagree on token ids"):
        P.QwenVLProcessor.from_config(dataclasses.replace(config, image_token_id=7), proc.tokenizer.name_or_path)
    with pytest.raises(ValueError, match="not a directory"):
        P.QwenVLProcessor.from_pretrained(tmp_path / "missing")
    Image.fromarray(image(64, 64)).save(tmp_path / "big.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    with pytest.raises(Image.DecompressionBombError):
        proc("<image 1>", [tmp_path / "big.png"])
