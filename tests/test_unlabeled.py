"""Unlabeled images: ``add-unlabeled`` preprocesses them with the dataset's plans beside its cases, refuses bad
input before any work, and only the pre-training trainers get them."""
import inspect
import json
import shutil

import blosc2
import numpy as np
import pytest
import SimpleITK as sitk
from nnunetv2.experiment_planning import plan_and_preprocess_entrypoints
from nnunetv2.training.dataloading.data_loader import nnUNetDataLoader
from nnunetv2.training.dataloading.nnunet_dataset import nnUNetDatasetBlosc2

from nnunet_plugins.cli import main
from nnunet_plugins.commands import unlabeled as unlabeled_command
from nnunet_plugins.commands.unlabeled import (CASE_FILES, DEFAULT_PROCESSES, DEFAULT_PROCESSES_OTHER, PARTIAL,
                                               UnlabeledImagesError, add_unlabeled, default_processes)
from nnunet_plugins.pretraining.unlabeled import nnUNetDatasetWithUnlabeled, unlabeled_folder, unlabeled_identifiers
from nnunet_plugins.training.mednext import nnUNetTrainerMedNeXtS, nnUNetTrainerMedNeXtS_PretrainRCR

from helpers import CONFIGURATION, DATASET_ID, DATASET_NAME

DATA_IDENTIFIER = 'nnUNetPlans_3d_fullres'


@pytest.fixture
def preprocessed(workspace, tmp_path, monkeypatch):
    """A copy of the tiny dataset's nnUNet_preprocessed, which these tests add to; its dataset folder."""
    root = tmp_path / 'nnUNet_preprocessed'
    shutil.copytree(workspace.root / 'nnUNet_preprocessed', root)
    monkeypatch.setenv('nnUNet_preprocessed', str(root))
    monkeypatch.setenv('nnUNet_raw', workspace.env['nnUNet_raw'])
    return root / workspace.preprocessed.name


@pytest.fixture
def images(workspace, tmp_path):
    """A folder of unlabeled images: the held-out ones, and a copy of training case 0 under another name."""
    folder = tmp_path / 'unlabeled'
    shutil.copytree(workspace.raw / 'imagesTs', folder)
    shutil.copy(workspace.raw / 'imagesTr' / f'{DATASET_NAME}_000_0000.nii.gz', folder / 'copy_000_0000.nii.gz')
    return folder


def test_unlabeled_images_are_preprocessed_as_the_datasets_own(preprocessed, images, capsys):
    assert main(['add-unlabeled', str(DATASET_ID), str(images), '-c', CONFIGURATION, '-np', '1']) == 0
    out = preprocessed / f'{DATA_IDENTIFIER}_unlabeled'
    assert f'added 4 unlabeled cases to {out}' in capsys.readouterr().out
    assert unlabeled_identifiers(preprocessed / DATA_IDENTIFIER) == [
        f'{DATASET_NAME}_010', f'{DATASET_NAME}_011', f'{DATASET_NAME}_012', 'copy_000']
    # the same image as a labeled case: nnU-Net's preprocessing gave the same array (spacing, cropping, normalisation)
    labeled = nnUNetDatasetBlosc2(str(preprocessed / DATA_IDENTIFIER)).load_case(f'{DATASET_NAME}_000')
    unlabeled = nnUNetDatasetBlosc2(str(out)).load_case('copy_000')
    np.testing.assert_array_equal(np.asarray(unlabeled[0]), np.asarray(labeled[0]))
    assert unlabeled[3]['spacing'] == labeled[3]['spacing']
    assert unlabeled[3]['bbox_used_for_cropping'] == labeled[3]['bbox_used_for_cropping']
    assert set(np.unique(np.asarray(unlabeled[1]))) <= {0, -1}  # nnU-Net's cropping mask, no label
    assert unlabeled[3]['class_locations'].keys() == labeled[3]['class_locations'].keys()
    assert all(len(v) == 0 for v in unlabeled[3]['class_locations'].values())
    # the labeled folder is untouched, so nnU-Net's own listing and splits stay the dataset's
    assert sorted(nnUNetDatasetBlosc2.get_identifiers(str(preprocessed / DATA_IDENTIFIER))) == \
        [f'{DATASET_NAME}_{i:03d}' for i in range(10)]
    # the same command again keeps what is finished; a case name taken by other images is refused
    assert main(['add-unlabeled', str(DATASET_ID), str(images), '-c', CONFIGURATION, '-np', '1']) == 0
    assert 'added 0 unlabeled cases to' in capsys.readouterr().out
    shutil.copy(images / f'{DATASET_NAME}_010_0000.nii.gz', images / 'copy_000_0000.nii.gz')
    with pytest.raises(SystemExit, match=r'already holds copy_000, preprocessed from other files .*; give --overwrite'):
        main(['add-unlabeled', str(DATASET_ID), str(images), '-c', CONFIGURATION])
    with pytest.raises(SystemExit, match=f'{images / "missing"} is not a folder'):
        main(['add-unlabeled', str(DATASET_ID), str(images / 'missing'), '-c', CONFIGURATION])


def test_only_the_pretraining_trainers_get_the_unlabeled_cases(preprocessed, images, make_trainer, monkeypatch):
    monkeypatch.setenv('nnUNet_preprocessed', str(preprocessed.parent))  # make_trainer pointed it at the original
    add_unlabeled(str(DATASET_ID), images, CONFIGURATION, processes=1)
    monkeypatch.setenv('nnUNet_n_proc_DA', '0')
    supervised = make_trainer(nnUNetTrainerMedNeXtS)
    supervised.initialize()
    train, val = supervised.do_split()
    assert not any(key.startswith('copy_') or key.endswith(('_010', '_011', '_012')) for key in train + val)

    pretraining = make_trainer(nnUNetTrainerMedNeXtS_PretrainRCR)
    pretraining.initialize()
    dataset_train, dataset_val = pretraining.get_tr_and_val_datasets()
    assert set(unlabeled_identifiers(pretraining.preprocessed_dataset_folder)) <= set(dataset_train.identifiers)
    assert dataset_val.identifiers == val  # validation stays on the labeled cases
    only_unlabeled = nnUNetDatasetWithUnlabeled(pretraining.preprocessed_dataset_folder, ['copy_000', 'Tiny_010'])
    loader = nnUNetDataLoader(only_unlabeled, 2, pretraining.configuration_manager.patch_size,
                              pretraining.configuration_manager.patch_size, pretraining.label_manager,
                              oversample_foreground_percent=1.0)  # no foreground: nnU-Net samples at random
    batch = loader.generate_train_batch()
    assert set(batch['keys']) <= {'copy_000', 'Tiny_010'}
    assert tuple(batch['data'].shape) == (2, 1, *pretraining.configuration_manager.patch_size)


def write(path, array, components: int = 1):
    image = sitk.GetImageFromArray(np.zeros((*array, components)) if components > 1 else np.zeros(array),
                                   isVector=components > 1)
    sitk.WriteImage(image, str(path))


@pytest.mark.parametrize('files, message', [
    (['a_0000.nii.gz', 'notes.txt'], r'not named as nnU-Net images, CASE_XXXX\.nii\.gz .*: notes\.txt'),
    (['a_0000.nii.gz', 'b_0001.nii.gz'], r'the dataset has 1 channel\(s\), .* b has channels \[1\]'),
    (['a_0000.nii.gz', 'a_0001.nii.gz'], r'a has channels \[0, 1\]'),
    (['rgb_0000.nii.gz'], r'one 2d or 3d single-channel image per file; these are not: rgb_0000\.nii\.gz \(3d, 3 '
                          r'components'),
    (['a_0000.nii.gz', 'b_0000.nii.gz', 'rgb_0000.nii.gz'], r'these are not: rgb_0000\.nii\.gz'),  # the last case
    (['Tiny_003_0000.nii.gz'], r'case names of .* are those of labeled cases of Dataset991_Tiny: Tiny_003\. Rename'),
])
def test_bad_folders_are_refused_before_any_work(preprocessed, tmp_path, files, message):
    folder = tmp_path / 'bad'
    folder.mkdir()
    for name in files:
        if name.endswith('.txt'):
            (folder / name).write_text('x')
        else:
            write(folder / name, (4, 8, 8), components=3 if name.startswith('rgb') else 1)
    with pytest.raises(UnlabeledImagesError, match=message):
        add_unlabeled(str(DATASET_ID), folder, CONFIGURATION, processes=2)
    assert not unlabeled_folder(preprocessed / DATA_IDENTIFIER).exists()


def _contents(folder) -> dict[str, object]:
    """Each file of ``folder`` by name: a Blosc2 array's values (as bytes, so -0.0 differs from 0.0), dtype, shape,
    chunks, blocks and compression settings; any other file's bytes. Not a Blosc2 file's bytes: nnU-Net compresses
    with 4 threads, which write other compressed bytes (of the same values) from one run to the next."""
    def content(path):
        if path.suffix != '.b2nd':
            return path.read_bytes()
        array = blosc2.open(str(path))
        return array[:].tobytes(), array.dtype, array.shape, array.chunks, array.blocks, array.schunk.cparams
    return {path.name: content(path) for path in sorted(folder.iterdir())}


def test_the_default_process_counts_are_nnunets():
    # nnU-Net 2.8.1 writes them inline in its entry points, so there is no constant to import
    source = inspect.getsource(plan_and_preprocess_entrypoints)
    assert f'default_np = {json.dumps(DEFAULT_PROCESSES)}' in source
    assert f'else {DEFAULT_PROCESSES_OTHER} for c in args.c' in source
    assert (default_processes('3d_fullres'), default_processes('2d'), default_processes('3d_cascade_fullres')) == \
        (4, 8, 4)


def test_two_processes_write_what_one_writes(preprocessed, images):
    out = unlabeled_folder(preprocessed / DATA_IDENTIFIER)
    add_unlabeled(str(DATASET_ID), images, CONFIGURATION, processes=1)
    one = _contents(out)
    shutil.rmtree(out)
    added = add_unlabeled(str(DATASET_ID), images, CONFIGURATION, processes=2)
    assert sorted(added.preprocessed) == ['Tiny_010', 'Tiny_011', 'Tiny_012', 'copy_000']
    two = _contents(out)
    assert len(one) == 12 and PARTIAL not in one  # 3 files a case, and the temporary folder is gone
    assert two == one


def test_an_interrupted_run_continues_without_redoing_finished_cases(preprocessed, images, monkeypatch, capsys):
    out = unlabeled_folder(preprocessed / DATA_IDENTIFIER)
    add_unlabeled(str(DATASET_ID), images, CONFIGURATION, processes=1)
    before = _contents(out)
    # as a killed run leaves it: Tiny_011 half-written in the temporary folder after an earlier attempt moved two of
    # its files in, copy_000 not started
    (out / PARTIAL).mkdir()
    (out / PARTIAL / 'Tiny_011.b2nd').write_bytes((out / 'Tiny_011.b2nd').read_bytes()[:100])
    (out / 'Tiny_011.b2nd').unlink()
    for suffix in CASE_FILES:
        (out / f'copy_000{suffix}').unlink()
    finished = {name: (out / name).stat().st_mtime_ns for name in before if name.startswith(('Tiny_010', 'Tiny_012'))}
    done = []
    preprocess = unlabeled_command._preprocess_case
    monkeypatch.setattr(unlabeled_command, '_preprocess_case', lambda case, **kw: (done.append(case.identifier),
                                                                                  preprocess(case, **kw)))
    assert main(['add-unlabeled', str(DATASET_ID), str(images), '-c', CONFIGURATION, '-np', '1']) == 0
    captured = capsys.readouterr()
    assert done == ['Tiny_011', 'copy_000']
    assert 'added 2 unlabeled cases' in captured.out and '(2 finished before from the same files were kept)' in \
        captured.out
    assert '2/4' in captured.err and '4/4' in captured.err  # the progress bar starts at the finished cases
    assert {name: (out / name).stat().st_mtime_ns for name in finished} == finished
    assert _contents(out) == before
