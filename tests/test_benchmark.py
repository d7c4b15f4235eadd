"""``nnunet-plugins benchmark``: the command end to end on a tiny patch, and its facts at the papers' setting."""
import argparse
import io
import json
import math
import re
import subprocess
import sys
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

import pytest
from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

from nnunet_plugins import settings
from nnunet_plugins.cli import main
from nnunet_plugins.commands.benchmark.peers import default_trainers, trainer_class
from nnunet_plugins.commands.benchmark.plans import resenc_l_plans, synthetic_dataset_json, synthetic_plans
from nnunet_plugins.commands.benchmark.command import inference_case, networks_to_run
from nnunet_plugins.commands.benchmark.report import chart, counterpart, topology_versus_monai
from nnunet_plugins.commands.benchmark.rows import ROW_FIELDS, Network, Row, plan_rows, probe
from nnunet_plugins.commands.benchmark.worker import measure, row_spec
from nnunet_plugins.workspace import environment

from helpers import CONFIGURATION, DATASET_ID, parameter_count, run_cli

COMMAND = str(Path(sys.executable).parent / 'nnunet-plugins')
# MedNeXt paper, Table 3: "GFLOPs" (multiply-accumulates) for one 128^3 patch, kernel 3 and kernel 5
PAPER_GMACS = {'S': (130, 169), 'B': (170, 208), 'M': (248, 308), 'L': (500, 564)}


def tiny_synthetic_plans() -> tuple[dict, dict, str]:
    """The benchmark's synthetic dataset.json, plans and configuration for the tiny run's patch (16x32x32, 3 classes),
    for the tests that plan or measure rows in-process."""
    dataset_json = synthetic_dataset_json(1, 3)
    plans, configuration = synthetic_plans([16, 32, 32], [1.0, 1.0, 1.0], 1, dataset_json)
    return dataset_json, plans, configuration


@pytest.fixture(scope='module')
def tiny_run(tmp_path_factory) -> tuple[subprocess.CompletedProcess, Path]:
    """The command on a 16x32x32 patch: MedNeXt-S with checkpointing off and on and MONAI's MedNeXt-S, one step each
    (which trainer gets which checkpointing rows, and nnU-Net's own trainer's row: in-process below). In this process,
    as :func:`helpers.run_cli` runs a command; each row runs in a subprocess of its own, as always."""
    out = tmp_path_factory.mktemp('benchmark')
    args = ['benchmark', '--patch', '16', '32', '32', '--classes', '3', '--batch', '1', '--device', 'cpu',
            '-tr', 'nnUNetTrainerMedNeXtS', '--baselines', '--peers', 'MedNeXtS', '--steps', '1', '--warmup', '0',
            '--out', str(out)]
    stdout, stderr = io.StringIO(), io.StringIO()
    with environment({name: None for name in settings.VARIABLES}), redirect_stdout(stdout), redirect_stderr(stderr):
        status = main(args)
    result = subprocess.CompletedProcess(['nnunet-plugins', *args], status, stdout.getvalue(), stderr.getvalue())
    assert result.returncode == 0, result.stdout + result.stderr
    return result, out


@pytest.mark.e2e
def test_json_has_every_field_for_every_row_and_a_reason_for_every_null(tiny_run):
    _, out = tiny_run
    rows = json.loads((out / 'benchmark.json').read_text())['rows']
    assert [(row['label'], row['gradient_checkpointing']) for row in rows] == [
        ('nnUNetTrainerMedNeXtS', False), ('nnUNetTrainerMedNeXtS', True),  # S: off by default, then flipped
        ('MONAI MedNeXtS', None)]
    for row in rows:
        assert tuple(row) == ROW_FIELDS
        assert row['status'] == 'ok'
        nulls = {key for key, value in row.items() if value is None}
        assert set(row['null_reasons']) == nulls, row['label']
        assert nulls <= {'gradient_checkpointing', 'autocast_dtype', 'case'}
        assert all(reason for reason in row['null_reasons'].values())
        assert len(row['step_times_s']) == 1 and row['step_time_s'] > 0 and row['peak_memory_bytes'] >= 0
        assert row['patch_size'] == [16, 32, 32] and row['batch_size'] == 1 and row['output_channels'] == 3
    by_label = {}
    for row in rows:
        by_label.setdefault(row['label'], []).append(row)
    # checkpointing on and off train the same network on the same batch: the same first loss, bit for bit
    first, second = by_label['nnUNetTrainerMedNeXtS']
    assert first['first_loss'] == second['first_loss'] and first['parameters'] == second['parameters']
    # each as its trainer runs it: the plugin trainers (and the peer, trained with their recipe) channels-last on a CPU
    assert {row['label']: (row['network_class'], row['memory_layout']) for row in rows} == {
        'nnUNetTrainerMedNeXtS': ('MedNeXt', 'channels-last'), 'MONAI MedNeXtS': ('MedNeXt', 'channels-last')}


def test_nnunets_own_trainer_is_measured_in_pytorchs_default_layout():
    """A baseline row as the row's process measures it (the worker's function, here in-process): nnU-Net's own
    network and trainer, one training step, PyTorch's default layout."""
    dataset_json, plans, configuration = tiny_synthetic_plans()
    network = Network('nnUNetTrainer', 'baseline', 'nnUNetTrainer (nnUNetPlans)', 'nnUNetTrainer', plans)
    assert probe(network, configuration, dataset_json)['network_class'] == 'PlainConvUNet'
    result = measure(row_spec(Row(network), configuration, dataset_json, 'cpu', steps=1, warmup=0))
    assert result['status'] == 'ok' and len(result['step_times_s']) == 1 and result['first_loss'] > 0
    assert result['memory_layout'] == 'contiguous'


def test_a_checkpointing_row_follows_each_trainers_default_with_the_other_setting():
    """MedNeXt-S checkpoints off by default, -M on: each default row comes first, then the flipped one; nnU-Net's own
    network has no switch and gets one row."""
    dataset_json, plans, configuration = tiny_synthetic_plans()
    args = argparse.Namespace(trainers=['nnUNetTrainerMedNeXtS', 'nnUNetTrainerMedNeXtM'], inference=False,
                              baselines=['nnUNetTrainer'], peers=[], pretraining=False)
    networks = networks_to_run(args, plans, configuration, dataset_json, None)
    rows = plan_rows(networks, configuration, dataset_json, ['checkpointing'], 'cpu')
    assert [(row.network.label, row.facts['default_checkpointing'], row.checkpointing) for row in rows] == [
        ('nnUNetTrainerMedNeXtS', False, None), ('nnUNetTrainerMedNeXtS', False, True),
        ('nnUNetTrainerMedNeXtM', True, None), ('nnUNetTrainerMedNeXtM', True, False),
        ('nnUNetTrainer (nnUNetPlans)', None, None)]


def test_a_prediction_is_compared_with_nnunets_own_network_and_the_other_layout_is_measured():
    """The inference rows the command plans by default with ``--variants channels-last``; the flipped row measured by
    the worker's function (in-process): one prediction of the same noise volume in PyTorch's default layout."""
    dataset_json, plans, configuration = tiny_synthetic_plans()
    args = argparse.Namespace(trainers=['nnUNetTrainerMedNeXtS'], inference=True, baselines=None, peers=None,
                              pretraining=False, volume=[16, 32, 48], disable_tta=True, case=None)
    networks = networks_to_run(args, plans, configuration, dataset_json, None)
    inference = inference_case(args, plans, configuration, dataset_json, None)
    rows = plan_rows(networks, configuration, dataset_json, ['channels-last'], 'cpu', inference=inference)
    assert [(row.network.label, row.flip_layout, row.inference['mode']) for row in rows] == [
        ('nnUNetTrainerMedNeXtS', False, 'inference'), ('nnUNetTrainerMedNeXtS', True, 'inference'),
        ('nnUNetTrainer (nnUNetPlans)', False, 'inference'), ('nnUNetTrainer (nnUNetPlans)', True, 'inference')]
    result = measure(row_spec(rows[1], configuration, dataset_json, 'cpu', steps=1, warmup=0))
    assert result['status'] == 'ok' and result['memory_layout'] == 'contiguous'
    assert len(result['step_times_s']) == 1 and result['step_cpu_times_s'][0] > 0


@pytest.mark.e2e
def test_report_table_ratios_and_chart(tiny_run):
    result, out = tiny_run
    report = (out / 'benchmark.md').read_text()
    assert report in result.stdout
    assert ('| network | setting | parameters | GMAC/patch | step (s) | step, CPU time (s) | memory (GiB) '
            '| voxels/s |') in report
    assert '| nnUNetTrainerMedNeXtS | checkpointing on, channels-last, fp32 |' in report
    ratios = json.loads((out / 'benchmark.json').read_text())['ratios']
    # on this plan our MedNeXt-S has 4 levels (the plans' strides), MONAI's always 5: reported, not hidden
    assert [(r['ours'], r['monai']) for r in ratios] == [('nnUNetTrainerMedNeXtS', 'MONAI MedNeXtS')] * 2
    assert all(r['topology'].startswith('differs: the plans give strides') for r in ratios)
    assert (out / 'benchmark.png').read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'


def test_chart_draws_rows_that_measured_no_memory(tmp_path):
    """A row whose process grew by less than allocator noise records 0 bytes (an inference row can); when every row
    does, the chart still draws them (it divided by the largest memory)."""
    records = [{'status': 'ok', 'kind': kind, 'label': label, 'gradient_checkpointing': None, 'parameters': parameters,
                'step_time_s': 0.5, 'peak_memory_bytes': 0}
               for kind, label, parameters in (('plugin', 'nnUNetTrainerMedNeXtS', 1_412_752),
                                               ('baseline', 'nnUNetTrainer', 5_439_564))]
    chart(records, tmp_path / 'benchmark.png', 'inference')
    assert (tmp_path / 'benchmark.png').read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'


def test_papers_setting_plans_macs_and_monai_sizes():
    dataset_json = synthetic_dataset_json(1, 14)
    plans, configuration = synthetic_plans([128, 128, 128], [1.0, 1.0, 1.0], 2, dataset_json)
    arch = plans['configurations'][configuration]['architecture']['arch_kwargs']
    assert [list(s) for s in arch['strides']] == [[1, 1, 1]] + [[2, 2, 2]] * 5
    assert plans['configurations'][configuration]['architecture']['network_class_name'].endswith('PlainConvUNet')
    resenc, _ = resenc_l_plans(plans, configuration, dataset_json, None)
    assert resenc['plans_name'] == 'nnUNetResEncUNetLPlans'
    resenc_arch = resenc['configurations'][configuration]['architecture']
    assert resenc_arch['network_class_name'].endswith('ResidualEncoderUNet')
    assert list(resenc_arch['arch_kwargs']['n_blocks_per_stage']) == [1, 3, 4, 6, 6, 6]
    assert resenc_arch['arch_kwargs']['strides'] == arch['strides']

    def facts(trainer: str) -> dict:
        return probe(Network(trainer, '', trainer, trainer, plans), configuration, dataset_json)

    for variant, paper in PAPER_GMACS.items():
        for kernel, paper_gmacs in zip(('', '_k5'), paper):
            ours = facts(f'nnUNetTrainerMedNeXt{variant}{kernel}')['forward_gmacs_per_patch']
            # the paper's counter adds a little (norms, activations) that ours leaves out
            assert 0.98 < ours / paper_gmacs < 1, (variant, kernel, ours)
    # MONAI's S is the authors' network; its B (and M, L) gives down blocks the wrong expansion ratio
    assert facts('MedNeXtS')['forward_gmacs_per_patch'] == facts('nnUNetTrainerMedNeXtS')['forward_gmacs_per_patch']
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager
    configuration_manager = PlansManager(plans).get_configuration(configuration)

    def parameters(trainer: str) -> int:
        return parameter_count(trainer_class(trainer).build_network_architecture(
            PlansManager(plans), configuration_manager, 1, 14, enable_deep_supervision=True))
    assert parameters('MedNeXtS') == parameters('nnUNetTrainerMedNeXtS') == 5_564_806
    assert parameters('nnUNetTrainerMedNeXtB') - parameters('MedNeXtB') == 15_456
    assert topology_versus_monai(trainer_class('nnUNetTrainerMedNeXtS'),
                                            configuration_manager) == 'same'
    # on these plans our Swin UNETR is MONAI's SwinUNETR peer: same size, multiply-adds and topology
    swin_unetr = [parameter_count(trainer_class(trainer).build_network_architecture(
        PlansManager(plans), configuration_manager, 1, 14, enable_deep_supervision=False))
        for trainer in ('nnUNetTrainerSwinUNETR', 'SwinUNETR')]
    assert swin_unetr == [62_187_296] * 2
    assert facts('SwinUNETR')['forward_gmacs_per_patch'] == facts('nnUNetTrainerSwinUNETR')['forward_gmacs_per_patch']
    assert topology_versus_monai(trainer_class('nnUNetTrainerSwinUNETR'), configuration_manager) == 'same'


def test_default_trainers_are_the_supervised_ones_each_network_once():
    names = default_trainers()
    assert names == [f'nnUNetTrainerMedNeXt{v}{k}' for k in ('', '_k5') for v in 'SBML'] + [
        'nnUNetTrainerSwinUNETR', 'nnUNetTrainerUTNetV2', 'nnUNetTrainerUXNet']


@pytest.mark.parametrize('args, message', [
    (['--patch', '100', '100', '100'], 'would train patch [112, 112, 112] rather than [100, 100, 100]'),
    (['--patch', '64', '64', '64', '--peers', 'MedNeXtX'], 'unknown baseline or peer MedNeXtX'),
    (['4'], 'give DATASET CONFIGURATION'),
    (['--patch', '16', '32', '32', '--inference', '--pretraining'], '--pretraining times pre-training steps'),
], ids=['patch-nnunet-would-not-plan', 'unknown-peer', 'no-configuration', 'pretraining-inference'])
def test_errors_say_what_is_wrong_before_anything_runs(args, message, tmp_path):
    with pytest.raises(SystemExit, match=re.escape(message)):
        main(['benchmark', *args, '--out', str(tmp_path / 'out')])
    assert not (tmp_path / 'out').exists()


@pytest.mark.e2e
def test_dataset_plans_are_read_and_nothing_lands_in_nnunet_results(workspace):
    """A planned dataset: the rows train at its (anisotropic) plan; ResEnc L is derived for the same patch because
    the dataset has no ResEnc L plans; the trainers' log folders go to a temporary folder, not nnUNet_results."""
    results = Path(workspace.env['nnUNet_results'])
    before = sorted(results.rglob('*')) if results.exists() else []
    out = workspace.root / 'benchmark'
    result = subprocess.run(
        [COMMAND, 'benchmark', str(DATASET_ID), CONFIGURATION, '--device', 'cpu', '-tr', 'nnUNetTrainerMedNeXtS',
         '--baselines', 'ResEncL', '--peers', '--variants', '--steps', '1', '--warmup', '0', '--out', str(out)],
        capture_output=True, text=True, env=workspace.env, stdin=subprocess.DEVNULL)
    assert result.returncode == 0, result.stdout + result.stderr
    plan = json.loads((workspace.preprocessed / 'nnUNetPlans.json').read_text())['configurations'][CONFIGURATION]
    rows = json.loads((out / 'benchmark.json').read_text())['rows']
    assert [(row['label'], row['status'], row['plans_name'], row['network_class']) for row in rows] == [
        ('nnUNetTrainerMedNeXtS', 'ok', 'nnUNetPlans', 'MedNeXt'),
        ('nnUNetTrainer (ResEnc L)', 'ok', 'nnUNetResEncUNetLPlans', 'ResidualEncoderUNet')]
    assert all(row['patch_size'] == plan['patch_size'] and row['batch_size'] == plan['batch_size'] for row in rows)
    assert 'ResEnc L baseline: nnUNetPlannerResEncL architecture for the same patch and spacing' in result.stdout
    assert (sorted(results.rglob('*')) if results.exists() else []) == before


PATCH = ['--patch', '16', '32', '32']


@pytest.mark.parametrize('args, code, message', [
    ([*PATCH, '--batch', '-1'], 2, "argument --batch: '-1' is not a positive whole number"),
    ([*PATCH, '--batch', '0'], 2, "argument --batch: '0' is not a positive whole number"),
    ([*PATCH, '--in-channels', '0'], 2, "argument --in-channels: '0' is not a positive whole number"),
    ([*PATCH, '--classes', '0'], 2, "argument --classes: '0' is not a positive whole number"),
    ([*PATCH, '--classes', '1'], 2, "argument --classes: '1' counts background alone; give at least 2 classes"),
    (['--patch', '0', '0', '0'], 2, "argument --patch: '0' is not a positive whole number"),
    ([*PATCH, '--spacing', '0', '0', '0'], 2, "argument --spacing: '0' is not a positive number"),
    ([*PATCH, '--spacing', '-1', '1', '1'], 2, "argument --spacing: '-1' is not a positive number"),
    ([*PATCH, '--steps', '0'], 2, "argument --steps: '0' is not a positive whole number"),
    (['999', '3d_fullres'], 1, "nnunet-plugins benchmark: error: dataset '999' not found"),
], ids=['batch-negative', 'batch-zero', 'no-input-channels', 'no-classes', 'background-only', 'patch-zero',
        'spacing-zero', 'spacing-negative', 'no-steps', 'unknown-dataset'])
def test_bad_arguments_fail_before_any_work_with_a_message(args, code, message, tmp_path, monkeypatch, capsys):
    out = tmp_path / 'out'
    for variable in ('nnUNet_raw', 'nnUNet_preprocessed', 'nnUNet_results'):
        monkeypatch.setenv(variable, str(tmp_path))
    result = run_cli(capsys, 'benchmark', *args, '--out', out)
    assert result.returncode == code, result.stderr
    assert message in result.stderr and result.stderr.count(message) == 1
    assert 'Traceback' not in result.stderr
    assert not out.exists()


def test_plans_words_the_same_mistake_the_same_way(capsys):
    result = run_cli(capsys, 'plans', '4', '--preset', 'mednext', '--batch', '0')
    assert result.returncode == 2 and "argument --batch: '0' is not a positive whole number" in result.stderr


def test_exit_code_is_not_zero_when_no_row_was_measured(tmp_path, capsys):
    """On a 16^3 patch nnU-Net plans three stages, and UTNetV2 needs four: its only row is skipped."""
    result = run_cli(capsys, 'benchmark', '--patch', '16', '16', '16', '-tr', 'nnUNetTrainerUTNetV2', '--baselines',
                     '--peers', '--device', 'cpu', '--out', tmp_path)
    assert result.returncode == 1, result.stdout + result.stderr
    assert 'no row was measured (1 skipped or failed' in result.stderr
    assert 'needs at least 4 resolution levels' in (tmp_path / 'benchmark.md').read_text()


@pytest.mark.e2e
def test_inference_rows_time_nnunets_prediction_of_one_case_and_have_every_field(tmp_path, capsys):
    """One MedNeXt-S prediction of a 16x32x48 noise volume (3 overlapping windows): every field, a reason for every
    null, and the CPU time the ratios use. (The other layout's row and the baseline beside it by default: in-process
    below.)"""
    result = run_cli(capsys, 'benchmark', *PATCH, '--classes', '3', '--device', 'cpu', '-tr', 'nnUNetTrainerMedNeXtS',
                     '--baselines', '--inference', '--volume', '16', '32', '48', '--disable-tta', '--variants',
                     '--steps', '1', '--warmup', '0', '--out', tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    report = json.loads((tmp_path / 'benchmark.json').read_text())
    assert report['meta']['mode'] == 'inference' and report['meta']['case'] == 'noise 16x32x48'
    assert report['meta']['ratio_clock'].startswith('process CPU time')
    rows = report['rows']
    assert [(row['label'], row['memory_layout']) for row in rows] == [('nnUNetTrainerMedNeXtS', 'channels-last')]
    for row in rows:
        assert tuple(row) == ROW_FIELDS and row['status'] == 'ok' and row['mode'] == 'inference'
        nulls = {key for key, value in row.items() if value is None}
        assert set(row['null_reasons']) == nulls
        assert nulls <= {'batch_size', 'first_loss', 'gradient_checkpointing', 'autocast_dtype'}
        assert row['step_time_s'] > 0 and row['cpu_time_s'] > 0
        assert row['voxels_per_second'] == pytest.approx(16 * 32 * 48 / row['step_time_s'])
    assert 'predictions after 0 warm-up, each nnU-Net\'s sliding-window prediction of noise 16x32x48' in \
        (tmp_path / 'benchmark.md').read_text()


def test_pretraining_rows_follow_their_networks_and_time_one_pretraining_step():
    """--pretraining adds, after each trainer's row, its network's pre-training trainers on the same plans (nnU-Net's
    own network and ResEnc L included); such a row times one pre-training step and is not paired with MONAI."""
    dataset_json, plans, configuration = tiny_synthetic_plans()
    args = argparse.Namespace(trainers=['nnUNetTrainerMedNeXtS', 'nnUNetTrainerUXNet'], inference=False,
                              baselines=['nnUNetTrainer', 'ResEncL'], peers=['MedNeXtS'], pretraining=True)
    networks = networks_to_run(args, plans, configuration, dataset_json, None)
    methods = ('_PretrainRCR', '_PretrainTokenCL', '_PretrainTokenBYOL', '_PretrainMAE')

    def followed_by_pretraining(trainer: str, label: str) -> list[tuple[str, str]]:
        return [(label, trainer)] + [(label.replace(trainer, trainer + m), trainer + m) for m in methods]
    assert [(network.label, network.trainer) for network in networks] == [
        *followed_by_pretraining('nnUNetTrainerMedNeXtS', 'nnUNetTrainerMedNeXtS'),
        *followed_by_pretraining('nnUNetTrainerUXNet', 'nnUNetTrainerUXNet'),
        *followed_by_pretraining('nnUNetTrainer', 'nnUNetTrainer (nnUNetPlans)'),
        *followed_by_pretraining('nnUNetTrainer', 'nnUNetTrainer (ResEnc L)'),
        ('MONAI MedNeXtS', 'MedNeXtS')]
    assert networks[6].label == 'nnUNetTrainerUXNet_PretrainRCR'
    assert networks[12].trainer == 'nnUNetTrainer_PretrainTokenCL'
    assert networks[16].plans is networks[15].plans and networks[16].plans['plans_name'] == 'nnUNetResEncUNetLPlans'
    assert counterpart(trainer_class('nnUNetTrainerMedNeXtS_PretrainRCR')) is None
    assert counterpart(trainer_class('nnUNetTrainerSwinUNETR_PretrainTokenBYOL')) is None
    assert counterpart(trainer_class('nnUNetTrainerMedNeXtS')) == ('MedNeXt', 'S', 3)

    result = measure(row_spec(Row(networks[1]), configuration, dataset_json, 'cpu', steps=1, warmup=0))
    assert result['status'] == 'ok', result
    assert len(result['step_times_s']) == 1 and result['step_times_s'][0] > 0
    # the sum of three losses on random input: L1 reconstruction, 4-way cross-entropy near ln 4, NT-Xent
    assert math.log(4) < result['first_loss'] < 20
    plans_manager = PlansManager(plans)
    model = trainer_class('nnUNetTrainerMedNeXtS_PretrainRCR').build_network_architecture(
        plans_manager, plans_manager.get_configuration(configuration), 1, 3)
    assert result['parameters'] == parameter_count(model) > parameter_count(model.network)  # the heads train too
    assert result['memory_layout'] == 'channels-last'  # the MedNeXt trainers' CPU layout, pre-training too
    # MAE's row: the whole network's step, the masked MSE of an untrained network's reconstruction of noise
    assert networks[4].trainer == 'nnUNetTrainerMedNeXtS_PretrainMAE'
    mae = measure(row_spec(Row(networks[4]), configuration, dataset_json, 'cpu', steps=1, warmup=0))
    assert mae['status'] == 'ok', mae
    assert 0.5 < mae['first_loss'] < 5
