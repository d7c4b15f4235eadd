"""Installation (regular wheel as well as editable) and the ``nnunet-plugins`` command."""
import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from nnunet_plugins import ext_trainer_folder
from nnunet_plugins.cli import build_parser
from nnunet_plugins.registry import plugin_trainers
from nnunet_plugins.workspace import NNUNET_FOLDERS

from helpers import run_cli

REPOSITORY = Path(__file__).resolve().parents[1]
COMMAND = str(Path(sys.executable).parent / 'nnunet-plugins')


def run(*args, env=None, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run([*args], capture_output=True, text=True, env=env, cwd=cwd, stdin=subprocess.DEVNULL)


@pytest.fixture(scope='module')
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp('wheel')
    result = run(sys.executable, '-m', 'pip', 'wheel', '--no-deps', '--no-build-isolation', '-w', str(out),
                 str(REPOSITORY))
    assert result.returncode == 0, result.stderr
    return next(out.glob('nnunet_plugins-*.whl'))


@pytest.mark.e2e
def test_wheel_holds_the_package_and_the_trainer_shims(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    assert {'nnunet_plugins/cli.py', 'nnunet_plugins/networks/mednext.py', 'nnunet_plugins/training/mednext.py',
            'nnunet_plugins/nnUNet_extTrainer/__init__.py',
            'nnunet_plugins/nnUNet_extTrainer/nnunet_plugins_trainers.py',
            'nnunet_plugins/commands/plans.py', 'nnunet_plugins/commands/benchmark/worker.py',
            'nnunet_plugins/commands/evaluate/metrics.py'} <= names
    presets = ('mednext', 'mednext-2d', 'uxnet', 'utnetv2-bcv', 'swinunetr')
    assert {f'nnunet_plugins/plans/{preset}.json' for preset in presets} <= names
    assert not any(name.startswith(('tests/', 'plans/')) for name in names)


@pytest.mark.e2e
def test_regular_install_lets_nnunet_find_the_trainers(wheel, tmp_path):
    target = tmp_path / 'site'
    result = run(sys.executable, '-m', 'pip', 'install', '--no-deps', '--target', str(target), str(wheel))
    assert result.returncode == 0, result.stderr
    shim_folder = target / 'nnunet_plugins' / 'nnUNet_extTrainer'
    env = {**os.environ, 'PYTHONPATH': str(target), 'nnUNet_extTrainer': str(shim_folder)}
    script = ('import sys, nnunet_plugins; from nnunetv2.utilities.find_objects import '
              'recursive_find_trainer_class_by_name as find; '
              'c = find("nnUNetTrainerMedNeXtL_k5"); print(nnunet_plugins.ext_trainer_folder(), c.__module__, '
              '"monai" in sys.modules)')
    result = run(sys.executable, '-c', script, env=env, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    folder, module, monai_imported = result.stdout.strip().splitlines()[-1].split()
    assert Path(folder) == shim_folder
    assert module == 'nnunet_plugins.training.mednext'
    assert monai_imported == 'False'  # MONAI comes with a Swin UNETR or a token view, not with every trainer lookup
    # the plans presets come with the package
    script = 'from nnunet_plugins import presets; print(presets.presets_folder(), *presets.load_presets())'
    result = run(sys.executable, '-c', script, env=env, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    folder, *names = result.stdout.split()
    assert Path(folder) == target / 'nnunet_plugins' / 'plans'
    assert names == ['mednext', 'mednext-2d', 'swinunetr', 'utnetv2-bcv', 'uxnet']


def test_every_subcommand_has_help(capsys):
    parser = build_parser()
    subcommands = parser._subparsers._group_actions[0].choices
    assert set(subcommands) == {'trainers', 'doctor', 'demo', 'plans', 'benchmark', 'evaluate', 'adapt-weights',
                                'add-unlabeled'}
    for name in subcommands:  # as the console script parses them, in-process; it runs as a script below
        result = run_cli(capsys, name, '--help')
        assert result.returncode == 0 and result.stdout.startswith(f'usage: nnunet-plugins {name}')


def test_trainers_lists_every_trainer_with_a_description(capsys):
    result = run_cli(capsys, 'trainers')
    assert result.returncode == 0
    lines = {line.split()[0]: line for line in result.stdout.splitlines() if line.startswith('nnUNetTrainer')}
    assert list(lines) == [t.__name__ for t in plugin_trainers()]
    assert 'MedNeXt-L, kernel 5' in lines['nnUNetTrainerMedNeXtL_k5']
    assert 'for nnUNetTrainerSwinUNETR' in lines['nnUNetTrainerSwinUNETR_PretrainRCR']


@pytest.mark.e2e
def test_the_console_script_prints_the_folder_for_nnunet_exttrainer():
    path = run(COMMAND, 'trainers', '--path').stdout.strip()  # the README's export line, as a shell runs it
    assert path == ext_trainer_folder() and (Path(path) / 'nnunet_plugins_trainers.py').is_file()


def test_doctor_fails_and_says_how_to_fix_then_passes(tmp_path, monkeypatch, capsys):
    for variable in (*NNUNET_FOLDERS, 'nnUNet_extTrainer'):
        monkeypatch.delenv(variable, raising=False)
    result = run_cli(capsys, 'doctor')
    assert result.returncode == 1
    assert '[FAIL] nnUNet_results is not set' in result.stdout
    assert f'fix: export nnUNet_extTrainer={ext_trainer_folder()}' in result.stdout

    monkeypatch.setenv('nnUNet_extTrainer', ext_trainer_folder())
    for variable in NNUNET_FOLDERS:
        (tmp_path / variable).mkdir()
        monkeypatch.setenv(variable, str(tmp_path / variable))
    result = run_cli(capsys, 'doctor')
    assert result.returncode == 0, result.stdout
    assert 'nnU-Net finds the plugin trainers' in result.stdout and 'all checks passed' in result.stdout


@pytest.mark.e2e
def test_demo_pipeline_runs_end_to_end_and_mednext_learns_the_organ(tmp_path, capsys):
    """The demo on tiny volumes, 3 epochs x 20 iterations on fold 0 (4 of 5 cases): a real learning check, the
    large organ is segmented on the unseen held-out cases (organ Dice 0.928 and 0.939 in two runs on 2026-12-04;
    0.78 after 2 epochs, too close to the bound)."""
    work = tmp_path / 'demo'
    args = ('demo', '--work', str(work), '--tiny', '--epochs', '3', '--iterations', '20',
            '--num-training', '5', '--num-heldout', '2', '--device', 'cpu', '--processes', '1')
    result = run(COMMAND, *args)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    summary = json.loads((work / 'demo_summary.json').read_text())
    print('held-out Dice after 60 iterations:', summary['dice'])
    assert set(summary['dice']) == {'organ', 'vessel', 'lesion'}
    assert all(0 <= d <= 1 for d in summary['dice'].values())
    assert summary['dice']['organ'] > 0.8
    assert (work / 'demo_heldout_case.png').read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'
    assert 'Dice on 2 held-out cases' in result.stdout
    # a second run refuses to replace the first unless asked to, before any work (in this process)
    again = run_cli(capsys, *args)
    assert again.returncode != 0 and f'{work} already holds a demo run' in again.stderr
    assert 'Pass --overwrite to replace it' in again.stderr


@pytest.mark.parametrize('option, message', [
    (['--epochs', '0'], "nnunet-plugins demo: error: argument --epochs: '0' is not a positive whole number"),
    (['--trainer', 'Bogus'], 'nnunet-plugins demo: error: --trainer Bogus: nnU-Net finds no trainer of that name'),
], ids=['epochs-zero', 'unknown-trainer'])
def test_demo_checks_its_options_before_any_work(tmp_path, capsys, option, message):
    work = tmp_path / 'demo'
    result = run_cli(capsys, 'demo', '--work', work, '--tiny', *option)
    assert result.returncode != 0
    assert result.stderr.count(message) == 1, result.stderr
    assert 'nnUNet_plugins_epochs' not in result.stderr and 'Traceback' not in result.stderr
    assert not work.exists()  # nothing generated or planned first


def test_doctor_says_a_file_is_not_a_folder(tmp_path, monkeypatch, capsys):
    for variable in NNUNET_FOLDERS:
        (tmp_path / variable).mkdir()
        monkeypatch.setenv(variable, str(tmp_path / variable))
    not_a_folder = tmp_path / 'results.txt'
    not_a_folder.write_text('')
    monkeypatch.setenv('nnUNet_results', str(not_a_folder))
    result = run_cli(capsys, 'doctor')
    assert result.returncode == 1
    assert f'[FAIL] nnUNet_results={not_a_folder} is a file, not a folder' in result.stdout
