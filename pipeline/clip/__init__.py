"""The method: Sparse CLIP's model, its contrastive objective and its training.

:mod:`~pipeline.clip.model` (open_clip's CLIP with wide sparse heads and a capped logit scale),
:mod:`~pipeline.clip.towers` (pretrained towers that work offline, and locking them),
:mod:`~pipeline.clip.loss` (the objective: open_clip's ClipLoss, plus L1 for that ablation),
:mod:`~pipeline.clip.tiled_loss` (the same loss and gradients in memory independent of the batch),
:mod:`~pipeline.clip.recipe` (the training recipe in torch alone: schedule, step, logging),
:mod:`~pipeline.clip.worker` and :mod:`~pipeline.clip.train` (the Ray Train worker loop and its driver),
:mod:`~pipeline.clip.feature_cache` (training on the locked towers' cached outputs) and
:mod:`~pipeline.clip.ablation` (the paper's Fig 2a-c sweep). Nothing is imported here, so a
reader of one module does not pay for the others.
"""
