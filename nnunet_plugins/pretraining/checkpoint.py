"""The pre-training checkpoint: nnU-Net's, with the method's heads beside the segmentation network's weights.

``network_weights`` holds the state dict of the supervised trainer's network (what stock ``-pretrained_weights``
reads), :data:`HEADS_KEY` the heads' (what ``--c`` restores besides nnU-Net's entries). The file is read by
:func:`nnunet_plugins.weights.read_checkpoint`, as every weight file.
"""
HEADS_KEY = 'pretraining_heads'
