"""Tasks of the training loop, one per file. A task has ``name`` (recorded in checkpoints), ``check(model
config)``, ``to(device)``, optionally ``compile()``, and ``__call__(model, batch) -> (loss, accuracy,
count)``: the mean loss and accuracy over the ``count`` rows of this rank's batch that they average. It may
also give the loop its AdamW groups (``param_groups``, as :func:`beitfast.training.optimization.param_groups`)
and its learning-rate schedule (``lr_schedule``, as :func:`beitfast.training.optimization.cosine_schedule`)."""
