"""Training: train state with trainable/frozen splits, the jitted step, stage transitions, Orbax checkpoints and
metrics (``state``, ``step``, ``stages``, ``checkpoint``, ``metrics``; they land with the training issue)."""
