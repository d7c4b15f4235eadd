"""``torchrun ... -m nnunet_plugins.train``: two torchrun agents on 127.0.0.1, each one gloo process on the CPU, as two
nodes would run (issue 26); the refusals before training in-process.

The agent runs are subprocesses because the issue asks for torchrun itself (its rendezvous, restarts and
environment); each trains MedNeXt-S for a few epochs of 2 iterations, with the test trainers of
``tests/torchrun_trainers`` (a checkpoint every epoch, no closing validation, every rank's weight hash).
"""
import hashlib
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from nnunetv2 import paths
from nnunetv2.utilities import file_path_utilities

from nnunet_plugins import settings
from nnunet_plugins.commands import train
from nnunet_plugins.commands.train import Launch, LaunchError, check_shared_folders
from nnunet_plugins.training.distributed import process_device

from helpers import CONFIGURATION, DATASET_ID, free_port, on_two_ranks, training_log

TEST_TRAINERS = Path(__file__).resolve().parent / 'torchrun_trainers'
SUPERVISED, PRETRAINING = 'nnUNetTrainerMedNeXtS_torchrun', 'nnUNetTrainerMedNeXtS_PretrainTokenCL_torchrun'
AGENT_TIMEOUT = 600


@pytest.fixture
def agent_env(workspace, tmp_path) -> dict:
    """The workspace's environment with results under ``tmp_path``, the test trainers, data loading in the training
    process, and 2 iterations per epoch."""
    env = dict(workspace.env)
    env['nnUNet_results'] = str(tmp_path / 'nnUNet_results')
    env['nnUNet_extTrainer'] = os.pathsep.join([env['nnUNet_extTrainer'], str(TEST_TRAINERS)])
    env['nnUNet_n_proc_DA'] = '0'
    env[settings.ITERATIONS] = '2'
    return env


def start_agents(env: dict, trainer: str, epochs: int, max_restarts: int = 0) -> list[subprocess.Popen]:
    """Two torchrun agents (node ranks 0 and 1, one process each, static rendezvous on 127.0.0.1) training fold 0."""
    port = free_port()
    return [subprocess.Popen(
        [sys.executable, '-m', 'torch.distributed.run', '--nnodes', '2', '--nproc-per-node', '1', '--node-rank',
         str(node), '--master-addr', '127.0.0.1', '--master-port', str(port), '--max-restarts', str(max_restarts),
         '--monitor-interval', '0.5', '-m', 'nnunet_plugins.train', str(DATASET_ID), CONFIGURATION, '0', '-tr',
         trainer, '-device', 'cpu'],
        env={**env, settings.EPOCHS: str(epochs)}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        stdin=subprocess.DEVNULL) for node in range(2)]


def finish(agents: list[subprocess.Popen]) -> list[str]:
    """Wait for the agents; assert that both exit 0; their output."""
    outputs = [agent.communicate(timeout=AGENT_TIMEOUT)[0] for agent in agents]
    for node, (agent, output) in enumerate(zip(agents, outputs)):
        assert agent.returncode == 0, f'agent {node} exited {agent.returncode}:\n{output[-6000:]}'
    return outputs


def fold_folder(env: dict, trainer: str) -> Path:
    dataset = Path(env['nnUNet_results']) / f'Dataset{DATASET_ID:03d}_Tiny'
    return dataset / f'{trainer}__nnUNetPlans__{CONFIGURATION}' / 'fold_0'


def state_dict_hash(state_dict: dict) -> str:
    """The hash the test trainers write (torchrun_trainers), of a state dict."""
    digest = hashlib.sha256()
    for name, tensor in state_dict.items():
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


@pytest.mark.e2e
@pytest.mark.parametrize('trainer', [SUPERVISED, PRETRAINING])
def test_two_agents_train_one_fold_with_equal_weights(agent_env, trainer):
    finish(start_agents(agent_env, trainer, epochs=2))
    fold = fold_folder(agent_env, trainer)
    files = sorted(p.name for p in fold.iterdir())
    assert 'checkpoint_final.pth' in files and 'checkpoint_latest.pth' not in files
    assert not [name for name in files if name.endswith('.partial')]
    assert len([name for name in files if name.startswith('training_log_')]) == 1  # rank 0's alone
    log = training_log(fold)
    assert 'torchrun: world size 2 (2 nodes x 1 process), backend gloo' in log
    assert 'the global batch of 2 split as 1+1 over the ranks' in log
    assert log.count('Epoch time') == 2
    rank0, rank1 = ((fold / f'weights_rank{rank}.sha256').read_text() for rank in range(2))
    assert rank0 == rank1
    checkpoint = torch.load(fold / 'checkpoint_final.pth', map_location='cpu', weights_only=False)
    assert checkpoint['current_epoch'] == 2
    if trainer == SUPERVISED:  # the pre-training checkpoint keeps network and heads apart
        assert state_dict_hash(checkpoint['network_weights']) == rank0


def _worker_of(agent: subprocess.Popen) -> int:
    """The PID of the training process a torchrun agent started."""
    children = Path(f'/proc/{agent.pid}/task/{agent.pid}/children').read_text().split()
    assert len(children) == 1, children
    return int(children[0])


@pytest.mark.e2e
@pytest.mark.filterwarnings('ignore:Unable to enable fault handler')  # torchrun's @record, under capture
def test_a_killed_worker_is_restarted_and_the_run_resumes_from_the_latest_checkpoint(agent_env, monkeypatch, capsys):
    agents = start_agents(agent_env, SUPERVISED, epochs=2, max_restarts=1)
    fold = fold_folder(agent_env, SUPERVISED)
    deadline = time.monotonic() + AGENT_TIMEOUT
    while not (fold / 'checkpoint_latest.pth').exists():  # written whole after epoch 0 (save_every = 1)
        assert time.monotonic() < deadline and all(agent.poll() is None for agent in agents)
        time.sleep(0.2)
    os.kill(_worker_of(agents[1]), signal.SIGKILL)  # rank 1, on "node" 1
    outputs = finish(agents)
    log = training_log(fold)
    assert 'resumed from checkpoint_latest.pth at epoch' in log, outputs[0][-4000:]
    assert 'resumed from checkpoint_latest.pth at epoch 1' in log  # saved after epoch 0, killed in epoch 1
    checkpoint = torch.load(fold / 'checkpoint_final.pth', map_location='cpu', weights_only=False)
    assert checkpoint['current_epoch'] == 2
    assert not (fold / 'checkpoint_latest.pth').exists()
    assert (fold / 'weights_rank0.sha256').read_text() == (fold / 'weights_rank1.sha256').read_text()
    # epoch 1 once or twice (when rank 0 finished it before it was stopped), then to the schedule's end
    assert log.count('Epoch time') >= 2
    # a restart on the finished fold trains nothing and says so: in-process, a group of one
    final = (fold / 'checkpoint_final.pth').read_bytes()
    for name, value in dict(RANK='0', LOCAL_RANK='0', WORLD_SIZE='1', MASTER_ADDR='127.0.0.1',
                            MASTER_PORT=str(free_port()), TORCHELASTIC_RESTART_COUNT='1').items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv('TORCHELASTIC_USE_AGENT_STORE', raising=False)
    for module in (paths, file_path_utilities):
        monkeypatch.setattr(module, 'nnUNet_results', agent_env['nnUNet_results'])
    monkeypatch.setattr(paths, 'nnUNet_preprocessed', agent_env['nnUNet_preprocessed'])
    monkeypatch.setattr(sys, 'argv', ['train', f'Dataset{DATASET_ID:03d}_Tiny', CONFIGURATION, '0', '-tr',
                                      SUPERVISED, '-device', 'cpu'])
    capsys.readouterr()
    train.main()
    assert 'holds checkpoint_final.pth: this fold has finished training, nothing is trained again' in \
        capsys.readouterr().out
    assert not torch.distributed.is_initialized()
    assert training_log(fold) == log and (fold / 'checkpoint_final.pth').read_bytes() == final


def test_a_world_larger_than_the_batch_is_refused_before_any_work(workspace, tmp_path, monkeypatch):
    monkeypatch.setattr(paths, 'nnUNet_preprocessed', workspace.env['nnUNet_preprocessed'])
    monkeypatch.setattr(paths, 'nnUNet_results', str(tmp_path / 'results'))
    for name, value in dict(RANK='0', LOCAL_RANK='0', WORLD_SIZE='3', LOCAL_WORLD_SIZE='3').items():
        monkeypatch.setenv(name, value)
    # by name: nnU-Net resolves an ID with the folders it read when it was imported
    monkeypatch.setattr(sys, 'argv', ['train', f'Dataset{DATASET_ID:03d}_Tiny', CONFIGURATION, '0', '-tr', SUPERVISED,
                                      '-device', 'cpu'])
    with pytest.raises(LaunchError) as refused:
        train.main()
    message = str(refused.value)
    assert '3 processes cannot share the global batch of 2 that nnUNetPlans plans for 3d_fullres' in message
    assert '`nnunet-plugins plans Dataset991_Tiny --preset NAME -c NEW_NAME --batch 3`' in message
    assert not torch.distributed.is_initialized() and not (tmp_path / 'results').exists()


def test_launch_is_read_from_torchruns_environment():
    assert Launch.from_environment({'RANK': '0'}) is None  # not torchrun: nnUNetv2_train as it is
    launch = Launch.from_environment({'RANK': '9', 'LOCAL_RANK': '1', 'WORLD_SIZE': '16', 'LOCAL_WORLD_SIZE': '8',
                                      'TORCHELASTIC_RESTART_COUNT': '2', 'TORCHELASTIC_MAX_RESTARTS': '3'})
    assert launch == Launch(rank=9, local_rank=1, world_size=16, local_world_size=8, restart=2, max_restarts=3)


def _check_folders(rank: int) -> dict:
    """Rank ``rank``'s view of two checks: folders shared by both ranks, then an nnUNet_results of rank 1's own."""
    root = Path(os.environ['TORCHRUN_TEST_ROOT'])
    shared = {'nnUNet_preprocessed': str(root / 'preprocessed'), 'nnUNet_results': str(root / 'results')}
    check_shared_folders(shared)
    own = dict(shared, nnUNet_results=str(root / ('results' if rank == 0 else 'results_of_rank1')))
    try:
        check_shared_folders(own)
    except LaunchError as error:
        return {'refused': str(error), 'left': sorted(os.listdir(root / 'results'))}
    return {'refused': None}


def test_a_rank_that_sees_another_results_folder_is_refused(tmp_path, monkeypatch):
    monkeypatch.setenv('TORCHRUN_TEST_ROOT', str(tmp_path))  # the spawned rank inherits it
    (tmp_path / 'preprocessed').mkdir()
    ranks = on_two_ranks(_check_folders, tmp_path)
    for seen in ranks:
        assert seen['refused'] == ranks[0]['refused']  # every rank stops, with the same message
        assert seen['left'] == []  # rank 0 removed its check files
    assert ranks[0]['refused'].startswith(
        f'rank 1 (host {socket.gethostname()}) does not see the nnUNet_results of rank 0 ({tmp_path / "results"}): '
        f'its nnUNet_results, {tmp_path / "results_of_rank1"}, lacks the file rank 0 wrote there. ')
    assert 'nnUNet_preprocessed' not in ranks[0]['refused'].split('. ')[0]


def test_each_process_takes_the_gpu_of_its_local_rank(monkeypatch):
    monkeypatch.setattr(torch.cuda, 'device_count', lambda: 2)
    assert process_device('cuda', 1) == torch.device('cuda', 1)  # on every node, not the global rank's
    assert process_device('cpu', 7) == torch.device('cpu')
    with pytest.raises(ValueError, match=r'LOCAL_RANK 2 trains on cuda:2, but this node has 2 CUDA devices .*'
                                         r'start at most 2 processes per node \(torchrun --nproc-per-node 2\)'):
        process_device('cuda', 2)
    with pytest.raises(ValueError, match='-device mps cannot train in a torchrun group'):
        process_device('mps', 0)
