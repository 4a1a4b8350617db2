"""Qwen2.5-VL's own processor end to end (``qk_jax.data.processors``): a Qwen2-style byte-level BPE tokenizer is
built here (the ``tokenizers`` library: Qwen2's pre-tokenizer regex, 96 learnt tokens, then Qwen's 14 special
tokens at their offsets) and saved with the Qwen2.5-VL processor files and chat template. The training pipeline's
``input_ids``, attention mask, ``pixel_values`` and ``image_grid_thw`` equal transformers' ``Qwen2_5_VLProcessor``
on the same prompts and images (no image, one, two interleaved; a padded batch); a tiny stage 1 trains on it and its
model keeps the tokenizer for sampling, the next stage and the export. Nothing is downloaded."""

import json

import numpy as np
import pytest
from PIL import Image

from configs import stage1, stage2, stage3
from qk_jax.data import manifest as manifest_lib
from qk_jax.data import pipeline, processors, qwen_processor
from qk_jax.models.qwen_vl import QwenVLConfig

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

# Qwen2's pre-tokenizer split (its tokenizer.json), then byte-level without its own regex.
QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
               r"|\s+(?!\S)|\s+")
# Qwen2.5-VL's special tokens in their order from <|endoftext|> (151643 in its vocabulary, 96 in the tiny config's).
SPECIAL = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
           "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>", "<|vision_end|>",
           "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>")
# Qwen2-VL / Qwen2.5-VL's chat template (chat_template.json of the released processors).
CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "{% endif %}<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}{{ message['content'] }}"
    "<|im_end|>\n{% else %}{% for content in message['content'] %}{% if content['type'] == 'image' or 'image' in"
    " content or 'image_url' in content %}{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}"
    "Picture {{ image_count.value }}: {% endif %}<|vision_start|><|image_pad|><|vision_end|>{% elif content['type']"
    " == 'video' or 'video' in content %}{% set video_count.value = video_count.value + 1 %}{% if add_vision_id %}"
    "Video {{ video_count.value }}: {% endif %}<|vision_start|><|video_pad|><|vision_end|>{% elif 'text' in content"
    " %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endif %}{% endfor %}{% if add_generation_prompt"
    " %}<|im_start|>assistant\n{% endif %}")
CORPUS = ("system\nYou are a helpful assistant.", "user\n", "assistant\n", "a red circle at the top left",
          "put the blue square next to the green triangle, then make it orange", "add the subject from the image")
RECORDS = (  # (task, prompt, number of images): none, one, two interleaved and out of order
    ("t2i", "a red circle at the top left", 0),
    ("edit", "make the circle in <image 1> blue", 1),
    ("multi", "put <image 2> next to <image 1> at the top", 2),
    ("t2i", "a green triangle", 0),
)
SIDE = 32  # the tiny configs' resolution: images already at the bucket, so both sides see the same pixels


def _reference_class():
    """transformers' ``Qwen2_5_VLProcessor`` without its video half, whose class needs torchvision (not installed):
    the text and image path is transformers' own."""

    class ImageOnly(transformers.Qwen2_5_VLProcessor):
        @classmethod
        def get_attributes(cls):
            return ["image_processor", "tokenizer"]

    return ImageOnly


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """A Qwen2.5-VL processor folder (tokenizer.json, tokenizer_config.json, chat template, processor config)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(QWEN2_SPLIT), behavior="isolated"),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=96, show_progress=False))
    assert tok.get_vocab_size() == 96
    tok.add_special_tokens(list(SPECIAL))
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<|endoftext|>",
                                                eos_token="<|im_end|>")
    vision = QwenVLConfig.from_config(stage1.get_config("tiny").vlm).vision
    image_processor = transformers.Qwen2VLImageProcessorPil(
        patch_size=vision.patch_size, temporal_patch_size=vision.temporal_patch_size,
        merge_size=vision.spatial_merge_size, min_pixels=56 * 56, max_pixels=vision.max_pixels)
    path = tmp_path_factory.mktemp("qwen_tokenizer")
    reference = _reference_class()(image_processor=image_processor, tokenizer=fast, chat_template=CHAT_TEMPLATE)
    reference.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def reference(folder):
    image_processor = transformers.Qwen2VLImageProcessorPil.from_pretrained(folder)
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    return _reference_class()(image_processor=image_processor, tokenizer=tokenizer,
                              chat_template=(folder / "chat_template.jinja").read_text())


def _image(seed):
    return np.random.default_rng(seed).integers(0, 256, (SIDE, SIDE, 3), dtype=np.uint8)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("qwen_data")
    lines = []
    for i, (task, prompt, n) in enumerate(RECORDS):
        Image.fromarray(_image(100 + i)).save(root / f"target{i}.png")
        inputs = []
        for k in range(n):
            Image.fromarray(_image(10 * i + k)).save(root / f"in{i}_{k}.png")
            inputs.append(dict(path=f"in{i}_{k}.png", role="source" if task == "edit" else "reference"))
        lines.append(json.dumps(dict(id=f"r{i}", task=task, prompt=prompt, target=f"target{i}.png", inputs=inputs)))
    (root / "train.jsonl").write_text("\n".join(lines) + "\n")
    return root


def _messages(prompt, n):
    """The prompt as chat content: text and image items in the order ``<image k>`` places them."""
    content = []
    for piece in manifest_lib.prompt_segments(prompt, n):
        content.append(dict(type="text", text=piece) if isinstance(piece, str) else dict(type="image"))
    return [dict(role="user", content=content)]


def test_the_pipeline_tokenises_as_transformers_qwen2_5_vl_processor(folder, reference, dataset):
    config = stage3.get_config("tiny")
    config.vlm.tokenizer = str(folder)
    config.cfg_dropout.text = config.cfg_dropout.image = 0.0
    pipe = pipeline.make_pipeline(config, manifest=str(dataset / "train.jsonl"), num_epochs=1, batch_size=2)
    assert isinstance(pipe.processor, qwen_processor.QwenVLProcessor)
    seen = 0
    for batch in pipe:
        rows = [int(i) for i, ok in zip(batch["record_index"], batch["valid"]) if ok]
        texts, images = [], []
        for i in rows:
            _, prompt, n = RECORDS[i]
            texts.append(reference.apply_chat_template(_messages(prompt, n), add_generation_prompt=True,
                                                       tokenize=False))
            order = [p for p in manifest_lib.prompt_segments(prompt, n) if not isinstance(p, str)]
            images += [_image(10 * i + k) for k in order]  # in token order, as transformers takes them
        want = reference(text=texts, images=images or None, padding=True, padding_side="right", return_tensors="np")
        length = want["input_ids"].shape[1]
        ids, mask = batch["input_ids"][: len(rows)], batch["attention_mask"][: len(rows)]
        np.testing.assert_array_equal(ids[:, :length], want["input_ids"])  # padded with <|endoftext|> alike
        np.testing.assert_array_equal(mask[:, :length], want["attention_mask"])
        assert not mask[:, length:].any()
        if images:
            m = batch["pixel_values"].shape[1]
            got = batch["pixel_values"][: len(rows)].reshape(len(rows) * m, -1, batch["pixel_values"].shape[-1])
            np.testing.assert_allclose(np.concatenate(list(got)), want["pixel_values"], atol=1e-6, rtol=0)
            np.testing.assert_array_equal(batch["image_grid_thw"][: len(rows)].reshape(-1, 3), want["image_grid_thw"])
        seen += len(rows)
    assert seen == len(RECORDS)


def test_the_paper_configs_need_qwens_tokenizer(folder, tmp_path):
    config = stage1.get_config()
    with pytest.raises(ValueError, match="config.vlm.tokenizer is not set"):
        processors.tokenizer_folder(config)
    config.pretrained.vlm = str(folder)  # the Qwen2.5-VL download holds its tokenizer: that one
    assert processors.tokenizer_folder(config) == str(folder)
    config.vlm.tokenizer = str(tmp_path)  # an empty folder
    with pytest.raises(ValueError, match="is not 'byte', 'word' or a local folder with a tokenizer"):
        processors.tokenizer_folder(config)
    assert processors.tokenizer_folder(stage1.get_config("tiny")) is None  # the tests' stand-in


def test_a_tokenizer_that_pads_otherwise_is_refused(folder):
    config = stage1.get_config("tiny")
    config.vlm.tokenizer = str(folder)
    config.vlm.text.bos_token_id = 97
    with pytest.raises(ValueError, match="pads with id 96"):
        processors.processor_for(config)


def test_a_tiny_stage1_trains_on_it_and_keeps_it(folder, tmp_path):
    from qk_jax import sampling
    from qk_jax.convert import export as export_lib
    from qk_jax.training import loop

    config = stage1.get_config("tiny")
    config.vlm.tokenizer = str(folder)
    config.total_steps = 3
    final = loop.train_stage(config, str(tmp_path / "stage1"))
    kept = tmp_path / "stage1" / "final" / processors.TOKENIZER_DIR
    assert (kept / "tokenizer.json").read_bytes() == (folder / "tokenizer.json").read_bytes()
    lines = [json.loads(line) for line in (tmp_path / "stage1" / "metrics.jsonl").read_text().splitlines()]
    assert [line["step"] for line in lines if "loss" in line][-1] == 3

    # The next stage reads the model's own copy; the sampler too, the original folder gone or not.
    config2 = stage2.get_config("tiny")
    config2.vlm.tokenizer = None
    config2.init_from = str(tmp_path / "stage1")
    assert processors.tokenizer_folder(config2) == str(kept)
    sampler = sampling.Sampler.from_checkpoint(final)
    assert isinstance(sampler.processor, qwen_processor.QwenVLProcessor)
    assert sampler.processor.tokenizer.name_or_path == str(kept)

    # The export's vlm/ is a tokenizer folder too: PyTorch users tokenise as the model was trained.
    export_lib.export_model(final, tmp_path / "export", log=lambda line: None)
    ours = transformers.AutoTokenizer.from_pretrained(tmp_path / "export" / "vlm")
    theirs = transformers.AutoTokenizer.from_pretrained(folder)
    assert ours("red circle")["input_ids"] == theirs("red circle")["input_ids"] != []
    settings = json.loads((tmp_path / "export" / "kontext_config.json").read_text())
    assert settings["tokenizer"] == "qwen"
