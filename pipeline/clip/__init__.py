"""The method: Sparse CLIP's model, its contrastive objective, the training loop and zero-shot.

:mod:`~pipeline.clip.model` (open_clip's CLIP with wide sparse heads and a capped logit scale),
:mod:`~pipeline.clip.loss` (open_clip's ClipLoss and the exact memory-bounded tiled ring loss),
:mod:`~pipeline.clip.train` (the Ray Train loop, its knobs, checkpoints and metric sink),
:mod:`~pipeline.clip.zeroshot` (prompt-ensembled classifiers) and
:mod:`~pipeline.clip.ablation` (the paper's Fig 2a-c sweep). Nothing is imported here, so a
reader of one module does not pay for the others.
"""
