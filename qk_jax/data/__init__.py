"""Data: ``manifest`` (the record schema, JSONL and ArrayRecord), ``buckets`` (aspect-ratio x input-count
bucketing as a checkpointable Grain ``IterDataset``), ``pipeline`` (the per-stage pipeline and its batch schema),
``processor`` (the Qwen2.5-VL processor) and ``shapes`` (the ShapesWorld generator and ``parse_scene``)."""
