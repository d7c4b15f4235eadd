"""``nnunet-plugins adapt-weights``: turn an encoder-only or foreign checkpoint into a file that stock
``nnUNetv2_train -pretrained_weights`` loads, for a trainer on a dataset's plans.

The target network is built as ``nnUNetv2_train`` builds it (the trainer's ``build_network_architecture`` on the
dataset's plans, input channels and labels); what fits is copied in (:mod:`nnunet_plugins.weights.transfer`), the rest
keeps that network's own initialisation; the file holds the whole state dict under ``network_weights``, and a
report of loaded, adapted and freshly initialised tensors is printed and written beside it (``OUT`` with
``.json``). When ``pretraining_report.json`` is beside the source, the report carries its cases on and warns about
every fold of the dataset's ``splits_final.json`` whose validation cases the pre-training trained on. An nnssl
checkpoint is mapped by its adaptation plan (:mod:`nnunet_plugins.weights.nnssl`), and the report says where the
configuration's spacing or patch differs from its pre-training's.
"""
import json
from dataclasses import asdict
from pathlib import Path

import torch
from nnunetv2.utilities.label_handling.label_handling import determine_num_input_channels
from nnunetv2.utilities.plans_handling.plans_handler import PlansManager
from torch import nn

from nnunet_plugins.commands.dataset_plans import DatasetPlans, PlansFileError, read_dataset_plans
from nnunet_plugins.commands.lookup import trainer_named
from nnunet_plugins.weights import ENCODER_PREFIX, TransferReport, adapt_checkpoint
from nnunet_plugins.weights.nnssl import spacing_and_patch_notes
from nnunet_plugins.weights.provenance import REPORT_FILE, leaking_folds_warning, pretraining_cases

SPLITS_FILE = 'splits_final.json'


def target_network(dataset: str, configuration: str, trainer: str, plans: str) -> tuple[nn.Module, int, str]:
    """The network ``nnUNetv2_train dataset configuration FOLD -tr trainer -p plans`` trains, at its
    initialisation, on the CPU; its number of input channels; and a description for the report.

    Raises ValueError (a :class:`PlansFileError` for plans) naming what is missing.
    """
    dataset_plans = read_dataset_plans(dataset, plans)
    if configuration not in dataset_plans.plans['configurations']:
        raise PlansFileError(f'{dataset_plans.plans_file} has no configuration {configuration!r}; it has '
                             f'{", ".join(dataset_plans.plans["configurations"])}.')
    trainer_class = trainer_named(trainer, '-tr')
    plans_manager = PlansManager(dataset_plans.plans)
    configuration_manager = plans_manager.get_configuration(configuration)
    dataset_json = dataset_plans.dataset_json()
    channels = determine_num_input_channels(plans_manager, configuration_manager, dataset_json)
    heads = plans_manager.get_label_manager(dataset_json).num_segmentation_heads
    deep_supervision = getattr(trainer_class, 'enable_deep_supervision', True) is not False
    network = trainer_class.build_network_architecture(plans_manager, configuration_manager, channels, heads,
                                                       deep_supervision)
    description = (f'{trainer}__{plans}__{configuration} of {dataset_plans.dataset_name} '
                   f'({type(network).__name__}, {channels} input channels)')
    return network, channels, description


def check_pretraining_folds(report: TransferReport, source: Path, dataset_plans: DatasetPlans) -> None:
    """Add to ``report`` the cases the pre-training behind ``source`` trained on, and a warning naming every fold of
    the dataset's splits whose validation cases are among them; or a note saying why the folds were not checked."""
    pretraining = pretraining_cases(source)
    if pretraining is None:
        report.notes.append(f'no {REPORT_FILE} beside {source}: which cases it was pre-trained on is unknown, so '
                            f'the folds were not checked')
        return
    report.pretraining = pretraining.entry()
    splits = dataset_plans.folder / SPLITS_FILE
    if not splits.is_file():
        report.notes.append(f'no {SPLITS_FILE} in {dataset_plans.folder} yet: the fine-tuning trainer checks its '
                            f'fold against the pre-training\'s cases when it starts')
        return
    folds = {fold: split['val'] for fold, split in enumerate(json.loads(splits.read_text()))}
    warning = leaking_folds_warning(pretraining, folds)
    report.notes.append(warning or f'the pre-training (fold {pretraining.fold}) trained on no validation case of '
                                   f'the {len(folds)} folds in {splits}')


def adapt_weights(source: Path, dataset: str, configuration: str, trainer: str, plans: str, out: Path,
                  decoder: bool = False, allow_partial: bool = False) -> TransferReport:
    """Write ``out`` (and ``out`` with ``.json``, the report) for ``source``; return the report.

    ``decoder=True`` also copies the decoder's tensors of matching name and shape (a whole network of another
    number of input channels); by default only the encoder's. ``allow_partial=True`` accepts a source that leaves
    more than :data:`~nnunet_plugins.weights.transfer.MAX_FRESH_SHARE` of the encoder fresh.
    """
    network, channels, description = target_network(dataset, configuration, trainer, plans)
    report = adapt_checkpoint(network, source, channels, ('',) if decoder else (ENCODER_PREFIX,), allow_partial,
                              description)
    report.target = description
    dataset_plans = read_dataset_plans(dataset, plans)
    if report.nnssl is not None:
        settings = PlansManager(dataset_plans.plans).get_configuration(configuration)
        report.notes += spacing_and_patch_notes(report.nnssl, list(settings.spacing), list(settings.patch_size),
                                                dataset, plans)
    check_pretraining_folds(report, Path(source).resolve(), dataset_plans)
    state = {name: tensor.detach().cpu().contiguous() for name, tensor in network.state_dict().items()}
    torch.save({'network_weights': state, 'adapt_weights_report': asdict(report)}, out)
    report.save(out.with_suffix('.json'))
    return report
