"""What only a CUDA GPU can show: fp16 autocast training and pre-training stay finite. Skipped on machines without
one."""
import numpy as np
import pytest
import torch

from nnunet_plugins.commands.benchmark.worker import random_batch
from nnunet_plugins.networks.mednext import mednext_from_plan
from nnunet_plugins.training.mednext import (nnUNetTrainerMedNeXtL_k5, nnUNetTrainerMedNeXtS,
                                             nnUNetTrainerMedNeXtS_PretrainMAE, nnUNetTrainerMedNeXtS_PretrainTokenCL)
from nnunet_plugins.training.swinunetr import nnUNetTrainerSwinUNETR

from helpers import PRETRAINING_PATCH, SWIN_PATCH, pretraining_step

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason='needs a CUDA GPU')


@pytest.mark.parametrize('trainer_class,configuration', [
    (nnUNetTrainerMedNeXtS, None), (nnUNetTrainerMedNeXtL_k5, None),
    (nnUNetTrainerSwinUNETR, {'patch_size': SWIN_PATCH}),  # the smallest patch it takes on the tiny plan
], ids=lambda c: getattr(c, '__name__', ''))
def test_fp16_autocast_training_keeps_the_loss_finite(make_trainer, monkeypatch, trainer_class, configuration):
    monkeypatch.setenv('nnUNet_compile', 'f')
    trainer = make_trainer(trainer_class, configuration, device='cuda')
    trainer.initialize()
    assert trainer.grad_scaler is not None  # nnU-Net trains with fp16 autocast and a GradScaler on CUDA
    batch = random_batch(trainer)
    losses = [float(trainer.train_step(batch)['loss']) for _ in range(30)]
    assert np.all(np.isfinite(losses))
    assert losses[-1] < losses[0]


@pytest.mark.parametrize('trainer_class', [nnUNetTrainerMedNeXtS_PretrainMAE, nnUNetTrainerMedNeXtS_PretrainTokenCL],
                         ids=lambda c: c.__name__)
def test_fp16_autocast_pretraining_keeps_the_loss_finite(make_trainer, monkeypatch, trainer_class):
    monkeypatch.setenv('nnUNet_compile', 'f')
    trainer = make_trainer(trainer_class, PRETRAINING_PATCH, device='cuda')
    trainer.initialize()
    assert trainer.grad_scaler is not None
    losses = [pretraining_step(trainer)['loss'] for _ in range(10)]
    assert np.all(np.isfinite(losses))


def test_gradient_checkpointing_changes_nothing_on_cuda():
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
    strides, kernels = [[1, 1, 1], [1, 2, 2], [2, 2, 2], [2, 2, 2]], [[1, 3, 3], [3, 3, 3], [3, 3, 3], [3, 3, 3]]
    torch.manual_seed(0)
    plain = mednext_from_plan(1, 3, strides, kernels, 'M', 5, gradient_checkpointing=False).cuda()
    checkpointed = mednext_from_plan(1, 3, strides, kernels, 'M', 5, gradient_checkpointing=True).cuda()
    checkpointed.load_state_dict(plain.state_dict())
    x = torch.randn(2, 1, 16, 64, 64, device='cuda')
    grads = []
    for network in (plain, checkpointed):
        sum(o.square().mean() for o in network(x)).backward()
        grads.append([p.grad for p in network.parameters()])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
