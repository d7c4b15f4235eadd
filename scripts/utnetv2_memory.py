"""Peak CPU memory of one UTNetV2 training step at two patch sizes: does it grow linearly with the voxels?

B-MHA never forms a voxels x voxels matrix (only voxels x semantic-map tokens), so the memory a training
step adds should grow in proportion to the voxels, not to their square. Each patch size runs in its own
Python process; what the step adds is that process's peak resident set size (``ru_maxrss``) after one
forward and backward pass minus its peak before the step (network built, input allocated). The network
is the paper's BCV setting (strides [1,1,1], [1,2,2], [1,2,2], [2,2,2], [2,2,2], 1 input channel,
14 classes, both outputs in the loss).

Usage: ``python scripts/utnetv2_memory.py [--patches 8,32,32 16,64,64] [--batch 1]``
"""
import argparse
import json
import math
import subprocess
import sys

BCV_STRIDES = [[1, 1, 1], [1, 2, 2], [1, 2, 2], [2, 2, 2], [2, 2, 2]]
BCV_KERNELS = [[1, 3, 3], [1, 3, 3], [3, 3, 3], [3, 3, 3], [3, 3, 3]]


def measure_step(patch: list[int], batch: int) -> dict:
    """One forward and backward pass in this process; the MiB its peak RSS rose by."""
    import torch
    from nnunet_plugins.commands.benchmark.worker import peak_rss_bytes
    from nnunet_plugins.networks.utnetv2 import utnetv2_from_plan
    torch.manual_seed(0)
    network = utnetv2_from_plan(1, 14, BCV_STRIDES, BCV_KERNELS)
    x = torch.randn(batch, 1, *patch)
    before = peak_rss_bytes()
    sum(output.float().mean() for output in network(x)).backward()
    return {'patch': patch, 'voxels': batch * math.prod(patch), 'step_peak_mib': (peak_rss_bytes() - before) / 2 ** 20}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--patches', nargs=2, default=['8,32,32', '16,64,64'], metavar='Z,Y,X',
                        help='two patch sizes, each axis divisible by 4,16,16 (default: %(default)s)')
    parser.add_argument('--batch', type=int, default=1)
    parser.add_argument('--child', metavar='Z,Y,X', help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure_step([int(p) for p in args.child.split(',')], args.batch)))
        return
    results = []
    for patch in args.patches:
        output = subprocess.run([sys.executable, __file__, '--child', patch, '--batch', str(args.batch)],
                                check=True, capture_output=True, text=True).stdout
        results.append(json.loads(output.strip().splitlines()[-1]))
        print(f'patch {patch:>12}  batch {args.batch}  voxels {results[-1]["voxels"]:>9,}  '
              f'step peak memory {results[-1]["step_peak_mib"]:8.0f} MiB', flush=True)
    voxel_ratio = results[1]['voxels'] / results[0]['voxels']
    memory_ratio = results[1]['step_peak_mib'] / results[0]['step_peak_mib']
    per_voxel = (results[1]['step_peak_mib'] - results[0]['step_peak_mib']) * 1024 / (
        results[1]['voxels'] - results[0]['voxels'])
    print(f'voxels x{voxel_ratio:.2f}, step peak memory x{memory_ratio:.2f} (linear: at most x{voxel_ratio:.2f}; '
          f'a voxels x voxels attention matrix would grow its share x{voxel_ratio ** 2:.0f}); '
          f'{per_voxel:.1f} KiB per added voxel')


if __name__ == '__main__':
    main()
