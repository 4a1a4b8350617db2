"""Evaluation: ShapesWorld scores of a checkpoint (``scoring``) and what its attention reads (``attention_maps``)."""
