"""The plugin's trainer classes, one module per network family (the supervised, UpKern, fine-tuning and
pre-training trainers of that family), on the shared base in ``base.py``.

:mod:`nnunet_plugins.registry` finds every trainer class of these modules by itself; nnU-Net finds them by name
through the shim in ``nnunet_plugins/nnUNet_extTrainer`` (the folder that ``nnunet-plugins trainers --path`` prints
for ``nnUNet_extTrainer``).
"""
