"""Data: manifests, aspect-ratio/reference-count buckets, the Grain pipeline and the ShapesWorld generator
(``manifest``, ``buckets``, ``pipeline``, ``processor``, ``shapes``; they land with the data issue)."""
