"""Unlabeled images beside a dataset's preprocessed cases, for the pre-training trainers only.

``nnunet-plugins add-unlabeled`` preprocesses a folder of unlabeled images with the dataset's plans into
``nnUNet_preprocessed/<dataset>/<data_identifier>_unlabeled/`` (:func:`unlabeled_folder`), in nnU-Net's own format:
a segmentation that is nnU-Net's cropping mask only (0 inside the image, -1 outside; no label), and empty
foreground locations, so nnU-Net's data loader samples their patches at random. Supervised trainers never see
them: nnU-Net lists a configuration's cases from its ``data_identifier`` folder, and ``splits_final.json`` is made
from that folder too. The pre-training trainer (:mod:`~nnunet_plugins.pretraining.nnunet_overrides`) takes them in:
its cases load with :class:`nnUNetDatasetWithUnlabeled`, and :func:`unlabeled_identifiers` join the training cases of
its split.
"""
from pathlib import Path

from nnunetv2.training.dataloading.nnunet_dataset import nnUNetDatasetBlosc2

UNLABELED_SUFFIX = '_unlabeled'


def unlabeled_folder(preprocessed_dataset_folder: str | Path) -> Path:
    """Where the unlabeled cases of a configuration's preprocessed folder (``.../<data_identifier>``) are."""
    folder = Path(preprocessed_dataset_folder)
    return folder.with_name(folder.name + UNLABELED_SUFFIX)


def unlabeled_identifiers(preprocessed_dataset_folder: str | Path | None) -> list[str]:
    """The identifiers of the unlabeled cases added to a configuration's preprocessed folder (sorted; [] if none,
    or if there is no such folder: a trainer built without ``nnUNet_preprocessed``, as the benchmark's are)."""
    if preprocessed_dataset_folder is None:
        return []
    folder = unlabeled_folder(preprocessed_dataset_folder)
    return sorted(nnUNetDatasetBlosc2.get_identifiers(str(folder))) if folder.is_dir() else []


class nnUNetDatasetWithUnlabeled(nnUNetDatasetBlosc2):
    """nnU-Net's dataset of a preprocessed folder, which also loads the folder's unlabeled cases by identifier.

    Constructed as nnU-Net constructs its datasets (``folder``, ``identifiers``); without ``identifiers`` it holds
    every labeled and unlabeled case. An unlabeled case loads with its cropping-mask segmentation and empty
    ``class_locations``.
    """

    def __init__(self, folder: str, identifiers: list[str] | None = None,
                 folder_with_segs_from_previous_stage: str | None = None):
        unlabeled = unlabeled_identifiers(folder)
        if identifiers is None:
            identifiers = self.get_identifiers(folder) + unlabeled
        super().__init__(folder, identifiers, folder_with_segs_from_previous_stage)
        wanted = set(identifiers)
        self.unlabeled = nnUNetDatasetBlosc2(str(unlabeled_folder(folder)), [i for i in unlabeled if i in wanted])
        self._unlabeled_identifiers = set(self.unlabeled.identifiers)

    def load_case(self, identifier: str):
        if identifier in self._unlabeled_identifiers:
            return self.unlabeled.load_case(identifier)
        return super().load_case(identifier)
