"""Environment variables read by the plugin trainers (nnU-Net's own, such as ``nnUNet_results``, stay nnU-Net's).

- ``nnUNet_plugins_epochs``: number of epochs of every plugin trainer (default 1000).
- ``nnUNet_plugins_iterations``: training iterations per epoch (default 250); validation
  iterations follow at nnU-Net's ratio of 1 to 5.
- ``nnUNet_plugins_warmup_epochs``: epochs of linear learning-rate warm-up (default: the trainer's
  ``warmup_epochs``, scaled to a schedule shortened by ``nnUNet_plugins_epochs``).
- ``nnUNet_plugins_checkpointing``: ``0`` switches gradient checkpointing off for the networks that
  use it by default (MedNeXt-M and -L), ``1`` switches it on for every network that supports it.
- ``nnUNet_plugins_upkern_source``: checkpoint file an UpKern trainer starts from, instead of the
  matching kernel-3 run's ``checkpoint_final.pth`` (e.g. a kernel-5 run, to go on to kernel 7).
"""
import os

EPOCHS = 'nnUNet_plugins_epochs'
ITERATIONS = 'nnUNet_plugins_iterations'
WARMUP_EPOCHS = 'nnUNet_plugins_warmup_epochs'
CHECKPOINTING = 'nnUNet_plugins_checkpointing'
UPKERN_SOURCE = 'nnUNet_plugins_upkern_source'
VARIABLES = (EPOCHS, ITERATIONS, WARMUP_EPOCHS, CHECKPOINTING, UPKERN_SOURCE)

_TRUE = ('1', 'true', 't', 'yes', 'on')
_FALSE = ('0', 'false', 'f', 'no', 'off')


def positive_int(name: str) -> int | None:
    """The value of environment variable ``name`` as a positive integer, or None when it is unset."""
    return _whole_number(name, 1)


def non_negative_int(name: str) -> int | None:
    """The value of environment variable ``name`` as an integer of at least 0, or None when it is unset."""
    return _whole_number(name, 0)


def _whole_number(name: str, minimum: int) -> int | None:
    value = os.environ.get(name)
    if value is None or value.strip() == '':
        return None
    try:
        number = int(value)
    except ValueError:
        number = minimum - 1
    if number < minimum:
        raise ValueError(f'{name}={value!r} is not {"a positive integer" if minimum == 1 else "an integer >= 0"}; '
                         f'set it to e.g. 5 or unset it')
    return number


def flag(name: str) -> bool | None:
    """The value of environment variable ``name`` as a boolean, or None when it is unset."""
    value = os.environ.get(name)
    if value is None or value.strip() == '':
        return None
    normalised = value.strip().lower()
    if normalised in _TRUE:
        return True
    if normalised in _FALSE:
        return False
    raise ValueError(f'{name}={value!r} is not a switch; set it to 0 or 1 or unset it')
