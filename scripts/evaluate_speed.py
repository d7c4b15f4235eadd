"""Cases per second of ``nnunet-plugins evaluate``'s metrics: on the crop around each label's masks, as the
command computes them, against MONAI's metric functions on the whole volume, on the same cases.

The segmentations are read once, before timing; then the two ways take turns measuring every case, ``--repeats``
rounds each, and each way's best round counts, by wall clock and by this process's CPU time. The numbers of both ways are checked to be equal.

Usage: ``python scripts/evaluate_speed.py PRED_DIR REF_DIR DATASET_JSON [--repeats 3] [--tolerance MM ...]
[--threads N]``
"""
import argparse
import json
import time
from pathlib import Path

import torch
from nnunetv2.imageio.reader_writer_registry import determine_reader_writer_from_dataset_json

from nnunet_plugins.commands.evaluate.metrics import case_metrics, label_set, read_segmentation

# wall-clock time, and the CPU time of this process (less disturbed by other processes on a shared machine)
CLOCKS = {'wall clock': time.perf_counter, 'CPU time': time.process_time}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('predictions', type=Path)
    parser.add_argument('references', type=Path)
    parser.add_argument('dataset_json', type=Path)
    parser.add_argument('--repeats', type=int, default=3)
    parser.add_argument('--tolerance', type=float, nargs='+')
    parser.add_argument('--threads', type=int, help='torch threads (default: torch\'s)')
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    dataset_json = json.loads(args.dataset_json.read_text())
    labels = label_set(dataset_json, args.tolerance)
    reader = determine_reader_writer_from_dataset_json(dataset_json, verbose=False)
    ending = dataset_json['file_ending']
    cases = []
    for prediction in sorted(args.predictions.glob(f'*{ending}')):
        reference, geometry = read_segmentation(args.references / prediction.name, reader, labels)
        cases.append((reference, read_segmentation(prediction, reader, labels)[0], geometry.spacing))
    seconds = {(clock, crop): [] for clock in CLOCKS for crop in (True, False)}
    results = {}
    for _ in range(args.repeats):  # the two ways take turns, so that a busy machine slows both alike
        for crop in (True, False):
            started = {clock: CLOCKS[clock]() for clock in CLOCKS}
            results[crop] = [case_metrics(reference, prediction, spacing, labels, crop=crop)
                             for reference, prediction, spacing in cases]
            for clock in CLOCKS:
                seconds[clock, crop].append(CLOCKS[clock]() - started[clock])
    assert results[True] == results[False], 'the crop changed a number'
    shape = 'x'.join(map(str, cases[0][0].shape))
    print(f'{len(cases)} cases (first {shape}), {len(labels.names)} labels, cases per second:')
    for clock in CLOCKS:
        crop, whole = (len(cases) / min(seconds[clock, crop]) for crop in (True, False))
        print(f'  by {clock}: crop {crop:.2f}, whole volume {whole:.2f}, {crop / whole:.2f}x')
    print('the same numbers both ways')


if __name__ == '__main__':
    main()
