"""``nnunet-plugins benchmark``: a model card per trainer (size, cost, speed, memory), measured side by side.

How each row is measured
- Everything is the trainer's own, as in ``nnUNetv2_train``: the trainer class is instantiated on the plans
  (its log file goes to a temporary folder), ``initialize()`` builds the network, the deep-supervision loss
  and the optimiser, and each step is its ``train_step`` (forward, loss, backward, gradient clipping,
  optimiser step; autocast and GradScaler on CUDA, channels-last where the trainer uses it, ``torch.compile``
  where nnU-Net uses it) on a random batch at the plans' patch and batch size.
- Step time: the median of ``steps`` steps after ``warmup`` steps, wall clock around ``train_step`` (which
  copies the batch to the device and reads the loss back, a synchronisation point).
- Peak memory: on CUDA ``torch.cuda.max_memory_allocated``; on a CPU the peak resident set size of the row's
  own process while it builds and trains, minus its resident size after the imports. Every row runs in a fresh
  subprocess, so rows share no memory, caches or compiled code.
- Multiply-accumulates: one forward pass of the inference network (deep supervision off) on one patch,
  counted by :func:`nnunet_plugins.macs.forward_macs` on the meta device.
- Parameters: the network as trained (deep-supervision heads included).

Rows: the plugin trainers; two baselines, ``nnUNetTrainer`` on the same plans and on ResEnc L plans; and MONAI's
MedNeXt S/B/M/L (kernel 3 and 5) and SwinUNETR as peers, trained with the MedNeXt trainers' recipe so that only
the network differs. With ``--inference`` a row times nnU-Net's prediction of one case instead.

Modules: :mod:`.peers` (which trainer a row name means; MONAI's networks as trainers), :mod:`.plans` (the
user's plans, or what nnU-Net's planners make of a patch), :mod:`.rows` (what is measured, and the JSON
record of each row), :mod:`.worker` (one row's measurement, run with ``python -m`` in a fresh process),
:mod:`.report` (table, ratios, chart) and :mod:`.command` (the command).
"""
