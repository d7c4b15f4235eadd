"""Environment variables read by the plugin trainers (nnU-Net's own, such as ``nnUNet_results``, stay nnU-Net's).

- ``nnUNet_plugins_epochs``: number of epochs of every plugin trainer (default 1000).
- ``nnUNet_plugins_iterations``: training iterations per epoch (default 250); validation
  iterations follow at nnU-Net's ratio of 1 to 5.
- ``nnUNet_plugins_warmup_epochs``: epochs of linear learning-rate warm-up (default: the trainer's
  ``warmup_epochs``, scaled to a schedule shortened by ``nnUNet_plugins_epochs``).
- ``nnUNet_plugins_checkpointing``: ``0`` switches gradient checkpointing off for the networks that
  use it by default (MedNeXt-M and -L), ``1`` switches it on for every network that supports it
  (MedNeXt, Swin UNETR's Swin blocks); the training log says when the network has none.
- ``nnUNet_plugins_upkern_source``: checkpoint file an UpKern trainer starts from, instead of the
  matching kernel-3 run's ``checkpoint_final.pth`` (e.g. a kernel-5 run, to go on to kernel 7).

A trainer reads them once, into a :class:`PluginSettings` it keeps (``trainer.plugin_settings``); nothing else in
``networks/`` or ``training/`` reads the environment.
"""
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

EPOCHS = 'nnUNet_plugins_epochs'
ITERATIONS = 'nnUNet_plugins_iterations'
WARMUP_EPOCHS = 'nnUNet_plugins_warmup_epochs'
CHECKPOINTING = 'nnUNet_plugins_checkpointing'
UPKERN_SOURCE = 'nnUNet_plugins_upkern_source'
VARIABLES = (EPOCHS, ITERATIONS, WARMUP_EPOCHS, CHECKPOINTING, UPKERN_SOURCE)

_TRUE = ('1', 'true', 't', 'yes', 'on')
_FALSE = ('0', 'false', 'f', 'no', 'off')


@dataclass(frozen=True)
class PluginSettings:
    """The plugin's environment variables, read and checked once; None where a variable is unset (or blank).

    ``values`` keeps every set variable as written (blanks stripped), in :data:`VARIABLES` order, for messages.
    """

    epochs: int | None = None  # >= 1
    iterations: int | None = None  # >= 1
    warmup_epochs: int | None = None  # >= 0
    checkpointing: bool | None = None
    upkern_source: Path | None = None  # ``~`` expanded; whether the file exists is the UpKern trainer's to check
    values: tuple[tuple[str, str], ...] = ()

    @classmethod
    def from_environment(cls, environ: Mapping[str, str] | None = None) -> 'PluginSettings':
        """Read :data:`VARIABLES` from ``environ`` (default ``os.environ``); raise ValueError naming the variable, its
        value and the fix when a value is not one the variable takes."""
        environ = os.environ if environ is None else environ
        values = tuple((name, environ[name].strip()) for name in VARIABLES if environ.get(name, '').strip())
        given = dict(values)
        source = given.get(UPKERN_SOURCE)
        return cls(epochs=_whole_number(given, EPOCHS, 1), iterations=_whole_number(given, ITERATIONS, 1),
                   warmup_epochs=_whole_number(given, WARMUP_EPOCHS, 0), checkpointing=_switch(given, CHECKPOINTING),
                   upkern_source=None if source is None else Path(source).expanduser(), values=values)

    def value(self, name: str) -> str | None:
        """Variable ``name`` as it was set, or None when it was not."""
        return dict(self.values).get(name)

    def as_set(self, *names: str) -> str:
        """Those of ``names`` that were set, as ``name='value'`` joined by commas (empty when none was)."""
        return ', '.join(f'{name}={value!r}' for name, value in self.values if name in names)


def _whole_number(given: Mapping[str, str], name: str, minimum: int) -> int | None:
    value = given.get(name)
    if value is None:
        return None
    try:
        number = int(value)
    except ValueError:
        number = minimum - 1
    if number < minimum:
        raise ValueError(f'{name}={value!r} is not {"a positive integer" if minimum == 1 else "an integer >= 0"}; '
                         f'set it to e.g. 5 or unset it')
    return number


def _switch(given: Mapping[str, str], name: str) -> bool | None:
    value = given.get(name)
    if value is None:
        return None
    if value.lower() in _TRUE:
        return True
    if value.lower() in _FALSE:
        return False
    raise ValueError(f'{name}={value!r} is not a switch; set it to 0 or 1 or unset it')
