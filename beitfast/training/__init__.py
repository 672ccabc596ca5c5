"""The parts of the trainer (:mod:`beitfast.train` holds the loop and re-exports every name):

* :mod:`.config`: ``TrainConfig``, the settings of a run;
* :mod:`.optimization`: AdamW, its parameter groups, the schedules, clipping, the non-finite skip;
* :mod:`.devices`: processes (``torchrun``), devices, DDP/FSDP, ``torch.compile``, float8 layers;
* :mod:`.checkpoints`: ``checkpoint.pt``, its verification and the exact resume (RNG states);
* :mod:`.progress`: ``metrics.jsonl``, the progress bar or log lines, ``curves.png``;
* :mod:`.tasks`: one file per task, each turning a batch into a loss and metrics.
"""
