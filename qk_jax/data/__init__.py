"""Data: ``tasks`` (the task vocabulary), ``manifest`` (the record schema, JSONL and ArrayRecord), ``buckets``
(aspect-ratio x input-count bucketing as a checkpointable Grain ``IterDataset``), ``images`` (decoding untrusted
images), ``processors`` (the stand-in tokenizers and ``processor_for``), ``qwen_processor`` (Qwen2.5-VL's own),
``pipeline`` (the per-stage pipeline and its batch schema), ``ingest`` (public dataset layouts -> manifests) and
``shapesworld`` (the ShapesWorld generator and ``parse_scene``). Commands: ``make_shapesworld``, ``manifest_tool``,
``prepare``, ``bench_data``."""
