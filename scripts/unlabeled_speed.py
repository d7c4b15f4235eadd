"""Cases per second of ``nnunet-plugins add-unlabeled`` at several ``-np``, on the same folder of synthetic images.

Makes, under WORK (once; kept for later runs), a synthetic CT-like dataset of ``--training`` cases, planned and
preprocessed by nnU-Net for 3d_fullres, and a folder of ``--cases`` unlabeled images of the same kind (each case's
grid and spacing vary by about 10 %, so every case is resampled). Then each ``-np`` in turn preprocesses the whole
folder again (``--overwrite``), ``--rounds`` times; a row is the wall-clock time of one whole call, process start-up
included, the CPU time of this process and its workers over it, and the load average before it (on a shared
machine the wall clock depends on what else runs; the CPU time much less).

Usage: ``python scripts/unlabeled_speed.py WORK [--cases 40] [--shape 56 160 160] [--spacing 2.5 0.8 0.8]
[--processes 1 2] [--rounds 1]``
"""
import argparse
import os
import resource
import subprocess
import time
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from nnunet_plugins import synthetic
from nnunet_plugins.workspace import nnunet_environment, stock_command

DATASET_ID = 990
CONFIGURATION = '3d_fullres'


def cpu_seconds() -> float:
    """CPU time (user and system) of this process and of its finished child processes so far."""
    return sum(usage.ru_utime + usage.ru_stime
               for usage in (resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('work', type=Path)
    parser.add_argument('--cases', type=int, default=40)
    parser.add_argument('--training', type=int, default=6)
    parser.add_argument('--shape', type=int, nargs=3, default=(56, 160, 160), help='mean grid (z, y, x)')
    parser.add_argument('--spacing', type=float, nargs=3, default=(2.5, 0.8, 0.8), help='mean spacing (z, y, x), mm')
    parser.add_argument('--processes', type=int, nargs='+', default=[1, 2])
    parser.add_argument('--rounds', type=int, default=1)
    args = parser.parse_args()
    env = nnunet_environment(args.work, processes=1)
    os.environ.update(env)  # before nnU-Net is imported: it reads its folders at import
    size = synthetic.SyntheticSize(tuple(args.shape), tuple(args.spacing))
    if not (args.work / 'nnUNet_preprocessed').is_dir():
        synthetic.write_dataset(env['nnUNet_raw'], DATASET_ID, 'UnlabeledSpeed', args.training, 0, size=size)
        subprocess.run([stock_command('nnUNetv2_plan_and_preprocess'), '-d', str(DATASET_ID), '-c', CONFIGURATION,
                        '-np', '1', '-npfp', '1'], env=env, check=True)
    images = args.work / f'unlabeled_{args.cases}'
    if not images.is_dir():
        images.mkdir()
        rng = np.random.default_rng(7)
        for i in range(args.cases):
            image, _, spacing = synthetic.make_case(rng, size)
            itk = sitk.GetImageFromArray(image)
            itk.SetSpacing(tuple(float(s) for s in reversed(spacing)))
            sitk.WriteImage(itk, str(images / f'unlabeled_{i:03d}_0000{synthetic.FILE_ENDING}'))

    from nnunet_plugins.commands.unlabeled import add_unlabeled
    rows = []
    for _ in range(args.rounds):
        for processes in args.processes:
            load = os.getloadavg()[0]
            started, cpu = time.perf_counter(), cpu_seconds()
            added = add_unlabeled(str(DATASET_ID), images, CONFIGURATION, overwrite=True, processes=processes)
            seconds, cpu = time.perf_counter() - started, cpu_seconds() - cpu
            rows.append(f'| {processes} | {len(added.preprocessed)} | {seconds:.1f} | '
                        f'{len(added.preprocessed) / seconds:.2f} | {cpu:.1f} | {load:.1f} |')
    print(f'{args.cases} images of about {args.shape} voxels at {args.spacing} mm, {os.cpu_count()} CPUs\n'
          '| -np | cases | seconds | cases/s | CPU seconds | load average before |\n|---|---|---|---|---|---|\n' +
          '\n'.join(rows))


if __name__ == '__main__':
    main()
