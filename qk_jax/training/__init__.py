"""Training: the train state with trainable/frozen splits (``state``), the one step builder (``step``), a stage's
set-up and the one loop (``loop``), stage transitions (``stages``), the curriculum (``curriculum``), stage 0 at
ShapesWorld scale (``stage0``), the ablations (``ablations``), Orbax checkpoints (``checkpoint``) and metrics."""
