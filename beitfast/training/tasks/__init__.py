"""Tasks of the training loop, one per file. A task has ``name`` (recorded in checkpoints), ``check(model
config)``, ``to(device)``, optionally ``compile()``, and ``__call__(model, batch) -> (loss, accuracy,
count)``: the mean loss and accuracy over the ``count`` rows of this rank's batch that they average.

Optional, each looked up by the loop: ``checksum()`` (what a checkpoint records of the task's targets, and
resume compares), ``param_groups`` (AdamW groups, as
:func:`beitfast.training.optimization.param_groups`) and ``lr_schedule`` (as
:func:`beitfast.training.optimization.cosine_schedule`)."""
