"""The ``nnunet-plugins`` command: its arguments and their checks; the work is in :mod:`nnunet_plugins.commands`.

Every argument is checked here, before any work starts. Heavy imports happen inside the subcommands,
so ``--help`` is quick.
"""
import argparse
import os
import sys
from pathlib import Path

from nnunet_plugins import __version__, ext_trainer_folder

# nnunet_plugins.weights.transfer.MAX_FRESH_SHARE, written here so that --help imports no torch (a test compares them)
MAX_FRESH_SHARE_SHOWN = '10%'


def _whole_number_of_at_least(minimum: int, words: str):
    """An argparse type: a whole number of at least ``minimum``; the error says ``'TEXT' is not WORDS``."""
    def check(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = minimum - 1
        if value < minimum:
            raise argparse.ArgumentTypeError(f'{text!r} is not {words}')
        return value
    return check


positive_int = _whole_number_of_at_least(1, 'a positive whole number')  # sizes, counts
non_negative_int = _whole_number_of_at_least(0, 'a whole number of at least 0')


def positive_float(text: str) -> float:
    """An argparse type: a finite number above 0 (spacings in mm)."""
    try:
        value = float(text)
    except ValueError:
        value = 0.0
    if not 0 < value < float('inf'):
        raise argparse.ArgumentTypeError(f'{text!r} is not a positive number')
    return value


def at_least_two(text: str) -> int:
    """An argparse type: a class count, background included, so at least 2."""
    value = positive_int(text)
    if value < 2:
        raise argparse.ArgumentTypeError(f'{text!r} counts background alone; give at least 2 classes')
    return value


def _fail(command: str, message: str) -> SystemExit:
    return SystemExit(f'nnunet-plugins {command}: error: {message}')


def _trainers(args: argparse.Namespace) -> int:
    if args.path:
        print(ext_trainer_folder())
        return 0
    from nnunet_plugins.registry import plugin_trainers
    trainers = plugin_trainers()
    width = max(len(t.__name__) for t in trainers)
    for trainer in trainers:
        print(f'{trainer.__name__:<{width}}  {trainer.__doc__.strip().splitlines()[0]}')
    print(f'\nnnU-Net finds them once this is set:\n  export nnUNet_extTrainer={ext_trainer_folder()}')
    return 0


def _doctor(args: argparse.Namespace) -> int:
    from nnunet_plugins.commands.doctor import run_checks
    return run_checks()


def _demo(args: argparse.Namespace) -> int:
    import torch
    from nnunet_plugins import synthetic
    from nnunet_plugins.commands.demo import run_demo
    from nnunet_plugins.commands.lookup import trainer_named
    try:
        trainer_named(args.trainer, '--trainer')
    except ValueError as error:
        raise _fail('demo', str(error)) from None
    device = args.device
    if device == 'auto':
        device = 'cuda' if torch.cuda.is_available() else 'cpu'
    run_demo(args.work, args.trainer, args.epochs, args.iterations, args.num_training, args.num_heldout,
             device, args.processes, args.overwrite, args.seed, synthetic.TINY if args.tiny else synthetic.DEMO)
    return 0


def _plans(args: argparse.Namespace) -> int:
    from nnunet_plugins.presets import PresetError, describe_presets
    if args.list:
        print(describe_presets())
        return 0
    if args.dataset is None or args.preset is None:
        raise _fail('plans', 'give a DATASET and --preset NAME (`nnunet-plugins plans --list` shows the presets)')
    from nnunet_plugins.commands.plans import add_preset, describe_added
    try:
        added = add_preset(args.dataset, args.preset, args.plans, args.configuration, args.spacing, args.patch,
                           args.batch, args.overwrite)
    except PresetError as error:
        raise _fail('plans', str(error)) from None
    print(describe_added(added))
    return 0


def _benchmark(args: argparse.Namespace) -> int:
    if args.patch:
        if args.dataset or args.configuration:
            raise _fail('benchmark', 'give either DATASET CONFIGURATION or --patch, not both')
        if len(args.patch) not in (2, 3):
            raise _fail('benchmark', f'--patch takes 2 or 3 sizes, got {len(args.patch)}')
        if args.spacing and len(args.spacing) != len(args.patch):
            raise _fail('benchmark', f'--spacing needs one value per patch axis ({len(args.patch)})')
    elif not (args.dataset and args.configuration):
        raise _fail('benchmark', 'give DATASET CONFIGURATION (e.g. 4 3d_fullres), or --patch Z Y X for a patch '
                                 'without a dataset')
    for option, given, applies, where in (('--case', args.case, args.inference and not args.patch, ' with a dataset'),
                                          ('--volume', args.volume, args.inference and args.patch, ' with --patch'),
                                          ('--disable-tta', args.disable_tta, args.inference, '')):
        if given and not applies:
            raise _fail('benchmark', f'{option} applies to --inference{where} only')
    if args.pretraining and args.inference:
        raise _fail('benchmark', '--pretraining times pre-training steps and a prediction has none; leave out '
                                 '--inference or --pretraining')
    from nnunet_plugins.commands.benchmark.command import run
    try:
        return run(args)
    except ValueError as error:
        raise _fail('benchmark', str(error)) from None


def _evaluate(args: argparse.Namespace) -> int:
    if (args.dataset is None) == (args.pred is None):
        raise _fail('evaluate', 'give either a DATASET (its cross-validation) or --pred FOLDER ... --ref FOLDER')
    if args.pred is not None and args.ref is None:
        raise _fail('evaluate', '--pred needs --ref, the folder of reference segmentations')
    if args.dataset is not None:
        stray = [flag for flag, value in (('--ref', args.ref), ('--dataset-json', args.dataset_json)) if value]
        if stray:
            raise _fail('evaluate', f'{" and ".join(stray)} go with --pred; a DATASET\'s references are its '
                                    f'gt_segmentations in nnUNet_preprocessed')
    else:
        stray = [flag for flag, value in (('-tr', args.trainers), ('-p', args.plans), ('-c', args.configurations),
                                          ('-f', args.folds)) if value]
        if stray:
            raise _fail('evaluate', f'{", ".join(stray)} choose among a DATASET\'s results; with --pred, name the '
                                    f'folders instead')
    from nnunet_plugins.commands.evaluate.command import run
    try:
        return run(args)
    except ValueError as error:
        raise _fail('evaluate', str(error)) from None


def _adapt_weights(args: argparse.Namespace) -> int:
    if not args.source.is_file():
        raise _fail('adapt-weights', f'{args.source} is not a file')
    if args.out.exists() and not args.overwrite:
        raise _fail('adapt-weights', f'{args.out} exists; give --overwrite to replace it, or another -o')
    if not args.out.parent.is_dir():
        raise _fail('adapt-weights', f'the folder of -o {args.out} does not exist')
    from nnunet_plugins.commands.adapt_weights import adapt_weights
    try:
        report = adapt_weights(args.source, args.dataset, args.configuration, args.trainer, args.plans, args.out,
                               args.decoder, args.allow_partial)
    except ValueError as error:  # CheckpointError, WeightTransferError, PlansFileError, an unknown trainer
        raise _fail('adapt-weights', str(error)) from None
    print('\n'.join(report.lines()))
    print(f'wrote {args.out} (report: {args.out.with_suffix(".json")}). Fine-tune with:\n  nnUNetv2_train '
          f'{args.dataset} {args.configuration} FOLD -tr {args.trainer} -p {args.plans} -pretrained_weights {args.out}')
    return 0


def _add_unlabeled(args: argparse.Namespace) -> int:
    if not args.folder.is_dir():
        raise _fail('add-unlabeled', f'{args.folder} is not a folder')
    from nnunet_plugins.commands.unlabeled import PreprocessingProcessDied, add_unlabeled
    try:
        added = add_unlabeled(args.dataset, args.folder, args.configuration, args.plans, args.overwrite,
                              args.processes)
    except (ValueError, PreprocessingProcessDied) as error:
        raise _fail('add-unlabeled', str(error)) from None
    kept = f' ({len(added.kept)} finished before from the same files were kept)' if added.kept else ''
    print(f'added {len(added.preprocessed)} unlabeled cases to {added.folder}{kept}; the pre-training trainers use '
          f'them beside the dataset\'s own images, the supervised trainers never do.')
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog='nnunet-plugins',
        description='MedNeXt and other networks as nnU-Net v2 trainers. Train them with the stock CLIs, e.g. '
                    '`nnUNetv2_train DATASET 3d_fullres 0 -tr nnUNetTrainerMedNeXtL`, once nnUNet_extTrainer '
                    'names the folder that `nnunet-plugins trainers --path` prints.')
    parser.add_argument('--version', action='version', version=f'%(prog)s {__version__}')
    commands = parser.add_subparsers(dest='command', required=True, metavar='COMMAND')

    trainers = commands.add_parser('trainers', help='list the plugin trainers',
                                   description='List every trainer the plugin provides, with a one-line description.')
    trainers.add_argument('--path', action='store_true',
                          help='print only the folder to put into nnUNet_extTrainer')
    trainers.set_defaults(run=_trainers)

    doctor = commands.add_parser(
        'doctor', help='check the installation and environment',
        description='Check what breaks nnU-Net plugins (nnunetv2 version, torchvision, nnU-Net folder variables, '
                    'nnUNet_extTrainer, CUDA) and say how to fix each problem. Exits non-zero if something is wrong.')
    doctor.set_defaults(run=_doctor)

    cores = os.cpu_count() or 2
    demo = commands.add_parser(
        'demo', help='train and evaluate MedNeXt on a synthetic dataset with the stock nnU-Net CLIs',
        description='Generate a synthetic CT-like dataset, then run nnUNetv2_plan_and_preprocess, nnUNetv2_train '
                    '(short schedule) and nnUNetv2_predict on held-out cases, and report their Dice per label and '
                    'a PNG of one case. nnU-Net\'s folder variables point into --work for these commands only.')
    demo.add_argument('--work', default='nnunet_plugins_demo', help='work folder (default: %(default)s)')
    demo.add_argument('--trainer', default='nnUNetTrainerMedNeXtS', help='trainer to run (default: %(default)s)')
    demo.add_argument('--epochs', type=positive_int, default=25, help='epochs (default: %(default)s)')
    demo.add_argument('--iterations', type=positive_int, default=12,
                      help='training iterations per epoch (default: %(default)s)')
    demo.add_argument('--num-training', type=positive_int, default=20, help='training cases (default: %(default)s)')
    demo.add_argument('--num-heldout', type=positive_int, default=5, help='held-out cases (default: %(default)s)')
    demo.add_argument('--device', choices=('auto', 'cpu', 'cuda'), default='auto',
                      help='auto: cuda when a GPU is available, else cpu (default: %(default)s)')
    demo.add_argument('--processes', type=positive_int, default=max(1, min(4, cores - 1)),
                      help='worker processes for nnU-Net (default on this machine: %(default)s)')
    demo.add_argument('--seed', type=non_negative_int, default=0,
                      help='seed of the synthetic dataset (default: %(default)s)')
    demo.add_argument('--tiny', action='store_true',
                      help='tiny volumes: a quick check that the pipeline runs, not a meaningful Dice')
    demo.add_argument('--overwrite', action='store_true', help='replace an earlier demo run in --work')
    demo.set_defaults(run=_demo)

    plans = commands.add_parser(
        'plans', help="add a paper's training setting (preset) to a dataset's plans as a new configuration",
        description="Add a paper's spacing, patch size and batch size to a dataset's nnU-Net plans as a configuration "
                    'that inherits_from 3d_fullres (or 2d), with its own data_identifier and the network topology '
                    "recomputed by nnU-Net's rules. Existing configurations and preprocessed data stay as they are. "
                    'Then run nnUNetv2_preprocess and nnUNetv2_train with the new configuration (printed).')
    plans.add_argument('dataset', nargs='?', metavar='DATASET', help='dataset id or name, e.g. 4')
    plans.add_argument('--preset', metavar='NAME', help='the setting to add, e.g. mednext (see --list)')
    plans.add_argument('--list', action='store_true', help='list the presets with their source and exit')
    plans.add_argument('-p', dest='plans', default='nnUNetPlans', metavar='PLANS',
                       help='plans identifier, e.g. nnUNetResEncUNetMPlans (default: %(default)s)')
    plans.add_argument('-c', dest='configuration', metavar='NAME',
                       help="name of the new configuration (default: the preset's, e.g. 3d_fullres_mednext)")
    plans.add_argument('--spacing', type=positive_float, nargs='+', metavar='MM',
                       help="override the preset's spacing, in the plans' axis order (coarsest axis first)")
    plans.add_argument('--patch', type=positive_int, nargs='+', metavar='VOXELS',
                       help="override the preset's patch size")
    plans.add_argument('--batch', type=positive_int, metavar='N', help="override the preset's batch size (at least 2)")
    plans.add_argument('--overwrite', action='store_true',
                       help='replace a configuration of the same name that an earlier preset made')
    plans.set_defaults(run=_plans)

    bench = commands.add_parser(
        'benchmark', help='parameters, multiply-adds, training-step time and peak memory per trainer, side by side',
        description='Build every trainer\'s network, loss and optimiser as nnUNetv2_train does and time its training '
                    'step on random batches, each row in its own process. Rows: the plugin trainers, nnUNetTrainer '
                    'on the same plans and on ResEnc L plans, and MONAI\'s MedNeXt S/B/M/L k3/k5 and SwinUNETR. With '
                    '--inference, nnU-Net\'s sliding-window prediction of one case instead. Prints a Markdown table '
                    'and writes benchmark.md, benchmark.json and benchmark.png to --out.')
    bench.add_argument('dataset', nargs='?', metavar='DATASET', help='dataset id or name, e.g. 4 (or use --patch)')
    bench.add_argument('configuration', nargs='?', metavar='CONFIGURATION', help='e.g. 3d_fullres')
    bench.add_argument('-p', dest='plans', default='nnUNetPlans', metavar='PLANS',
                       help='plans identifier (default: %(default)s)')
    bench.add_argument('--patch', type=positive_int, nargs='+', metavar='VOXELS',
                       help='benchmark without a dataset, on the plans nnU-Net\'s default planner makes for this '
                            'patch, e.g. 128 128 128')
    bench.add_argument('--spacing', type=positive_float, nargs='+', metavar='MM',
                       help='with --patch (default: 1 mm isotropic)')
    bench.add_argument('--in-channels', type=positive_int, default=1, help='with --patch (default: %(default)s)')
    bench.add_argument('--classes', type=at_least_two, default=14,
                       help='with --patch: output classes, background included (default: %(default)s)')
    bench.add_argument('--batch', type=positive_int, metavar='N',
                       help='batch size (default: the plans\'; 2 with --patch)')
    bench.add_argument('-tr', dest='trainers', nargs='+', metavar='TRAINER',
                       help='trainers to benchmark (default: every plugin trainer except the _UpKern and _Finetune '
                            'ones)')
    bench.add_argument('--baselines', nargs='*', metavar='NAME',
                       help='nnU-Net baselines: nnUNetTrainer, ResEncL (default: both; none if given empty)')
    bench.add_argument('--peers', nargs='*', metavar='NAME',
                       help='MONAI peers: MedNeXtS ... MedNeXtL_k5, SwinUNETR (default: all when MONAI is installed; '
                            'none if given empty)')
    bench.add_argument('--variants', nargs='*', default=['checkpointing'],
                       choices=('checkpointing', 'channels-last', 'bf16', 'compile'),
                       help='extra rows, each changing one setting from the trainer\'s own: checkpointing flipped '
                            '(networks that have it), the other memory layout, bf16 instead of fp16 autocast (CUDA), '
                            'torch.compile flipped (CUDA) (default: %(default)s)')
    bench.add_argument('--pretraining', action='store_true',
                       help='after each trainer\'s row (nnUNetTrainer\'s included), a row per self-supervised '
                            'pre-training trainer of its network (_PretrainRCR, ...): one pre-training step')
    bench.add_argument('--device', choices=('cpu', 'cuda'), help='default: cuda when a GPU is available, else cpu')
    bench.add_argument('--steps', type=positive_int, metavar='N',
                       help='timed steps per row (default: 10 on cuda, 3 on cpu)')
    bench.add_argument('--warmup', type=non_negative_int, metavar='N',
                       help='untimed steps first (default: 3 on cuda, 1 on cpu)')
    bench.add_argument('--inference', action='store_true',
                       help='time nnU-Net\'s sliding-window prediction of one case instead of a training step (rows: '
                            'the trainers and nnUNetTrainer on the same plans; variant: channels-last)')
    bench.add_argument('--case', metavar='NAME',
                       help='with --inference and a dataset: the preprocessed case to predict (default: the first)')
    bench.add_argument('--volume', type=positive_int, nargs='+', metavar='VOXELS',
                       help='with --inference and --patch: the size of the noise volume to predict (default: twice '
                            'the patch)')
    bench.add_argument('--disable-tta', action='store_true',
                       help='with --inference: no mirroring (nnUNetv2_predict --disable_tta)')
    bench.add_argument('--out', default='nnunet_plugins_benchmark', help='output folder (default: %(default)s)')
    bench.set_defaults(run=_benchmark)

    evaluate = commands.add_parser(
        'evaluate', help='Dice, NSD and HD95 per label across trainers, from the cross-validation or any folders',
        description='Measure Dice (as nnU-Net does), normalised surface Dice (NSD) and HD95 (both by MONAI, in mm) '
                    'per case and label, for every TRAINER__PLANS__CONFIG of a dataset with validation output (its '
                    'cross-validation), or for prediction folders against a reference folder (a test set, an '
                    'nnUNetv2_ensemble output). With --baseline, paired Wilcoxon signed-rank tests of each model '
                    'against it. Writes evaluation.json, .csv, .md and .png (for more than 8 labels the figure in '
                    'pages evaluation_1.png, ...) to --out.')
    evaluate.add_argument('dataset', nargs='?', metavar='DATASET', help='dataset id or name, e.g. 4')
    evaluate.add_argument('-tr', dest='trainers', nargs='+', metavar='TRAINER',
                          help='trainers to evaluate (default: every one with validation output)')
    evaluate.add_argument('-p', dest='plans', nargs='+', metavar='PLANS', help='plans identifiers (default: any)')
    evaluate.add_argument('-c', dest='configurations', nargs='+', metavar='CONFIGURATION',
                          help='configurations (default: any)')
    evaluate.add_argument('-f', dest='folds', nargs='+', type=non_negative_int, metavar='FOLD',
                          help='folds (default: every fold with validation output)')
    evaluate.add_argument('--pred', nargs='+', type=Path, metavar='FOLDER',
                          help='prediction folders to evaluate instead of a DATASET (each one model, named after '
                               'its folder)')
    evaluate.add_argument('--ref', type=Path, metavar='FOLDER', help='with --pred: the reference segmentations')
    evaluate.add_argument('--dataset-json', type=Path, metavar='FILE',
                          help='with --pred: the dataset.json with labels and file ending (default: the one '
                               'nnUNetv2_predict wrote into the first --pred folder)')
    evaluate.add_argument('--baseline', metavar='NAME',
                          help='a trainer (or TRAINER__PLANS__CONFIG, or --pred folder name) to test the others '
                               'against')
    evaluate.add_argument('--tolerance', nargs='+', type=positive_float, metavar='MM',
                          help='NSD tolerance in mm: one value, or one per label in dataset.json\'s order '
                               '(default: 1.0, as the MedNeXt paper)')
    evaluate.add_argument('--allow-missing', action='store_true',
                          help='evaluate the cases that have a reference and every prediction, and say which were '
                               'left out, instead of stopping')
    evaluate.add_argument('-np', dest='processes', type=positive_int, metavar='N',
                          help="worker processes (default: nnU-Net's, nnUNet_def_n_proc or 8)")
    evaluate.add_argument('--out', metavar='FOLDER',
                          help='output folder (default: $nnUNet_results/DATASET/evaluation, or an evaluation '
                               'folder in the first --pred folder)')
    evaluate.set_defaults(run=_evaluate)

    adapt = commands.add_parser(
        'adapt-weights',
        help='make an encoder-only or foreign checkpoint loadable by nnUNetv2_train -pretrained_weights',
        description='Build the network TRAINER trains on a dataset\'s plans, copy in the encoder tensors of SOURCE '
                    'that fit (an nnU-Net checkpoint of other plans or another trainer, a pre-trained encoder, the '
                    'Swin UNETR authors\' released encoder), repeating the stem\'s input channels when the dataset has '
                    'more, keep the network\'s own initialisation for the rest, and write a file that `nnUNetv2_train '
                    '... -pretrained_weights OUT` loads, with a report of loaded and freshly initialised tensors. A '
                    'file of which nothing fits, or whose tensors have other shapes, is an error; so is one that '
                    f'leaves more than {MAX_FRESH_SHARE_SHOWN} of the encoder fresh, unless --allow-partial. When '
                    'pretraining_report.json is beside SOURCE, it warns about every fold whose validation cases the '
                    'pre-training trained on.')
    adapt.add_argument('source', type=Path, metavar='SOURCE', help='the checkpoint file to start from')
    adapt.add_argument('-d', dest='dataset', required=True, metavar='DATASET', help='target dataset id or name')
    adapt.add_argument('-c', dest='configuration', required=True, metavar='CONFIGURATION',
                       help='target configuration, e.g. 3d_fullres')
    adapt.add_argument('-tr', dest='trainer', required=True, metavar='TRAINER',
                       help='the trainer that will fine-tune, e.g. nnUNetTrainerMedNeXtS_Finetune')
    adapt.add_argument('-p', dest='plans', default='nnUNetPlans', metavar='PLANS',
                       help='plans identifier (default: %(default)s)')
    adapt.add_argument('-o', dest='out', type=Path, required=True, metavar='OUT', help='the file to write (.pth)')
    adapt.add_argument('--decoder', action='store_true',
                       help='also copy the decoder\'s tensors of matching name and shape (a whole network with another '
                            'number of input channels); by default only the encoder\'s')
    adapt.add_argument('--allow-partial', action='store_true',
                       help=f'accept a SOURCE that leaves more than {MAX_FRESH_SHARE_SHOWN.replace("%", "%%")} of the '
                            'encoder\'s values at their initialisation (by default refused, listing what is missing '
                            'by module)')
    adapt.add_argument('--overwrite', action='store_true', help='replace an existing OUT')
    adapt.set_defaults(run=_adapt_weights)

    unlabeled = commands.add_parser(
        'add-unlabeled', help='preprocess unlabeled images with a dataset\'s plans, for pre-training only',
        description='Preprocess a folder of unlabeled images (named as nnU-Net\'s imagesTr: CASE_0000.nii.gz, one '
                    'file per channel) with nnU-Net\'s preprocessor and the plans of DATASET\'s CONFIGURATION (same '
                    'spacing, normalisation and intensity statistics) into a folder beside its preprocessed cases, '
                    '<data_identifier>_unlabeled, where the pre-training trainers find them and the supervised '
                    'trainers never look. Names, channels and image headers of every case are checked before the '
                    'first case is written. Each case is written to a temporary name and then moved in, so an '
                    'interrupted run is continued by running the same command again: cases finished before from '
                    'the same files are kept, the others (a case killed mid-write too) are preprocessed.')
    unlabeled.add_argument('dataset', metavar='DATASET', help='dataset id or name, e.g. 4')
    unlabeled.add_argument('folder', type=Path, metavar='FOLDER', help='the folder of unlabeled images')
    unlabeled.add_argument('-c', dest='configuration', required=True, metavar='CONFIGURATION',
                           help='the (preprocessed) configuration to add them to, e.g. 3d_fullres')
    unlabeled.add_argument('-p', dest='plans', default='nnUNetPlans', metavar='PLANS',
                           help='plans identifier (default: %(default)s)')
    unlabeled.add_argument('-np', dest='processes', type=positive_int, metavar='N',
                           help='processes that preprocess cases in parallel (default: nnUNetv2_preprocess\'s, 8 for '
                                '2d and 3d_lowres, 4 for 3d_fullres and any other configuration). As nnU-Net warns, '
                                'resampling takes much memory: lower N if memory runs out')
    unlabeled.add_argument('--overwrite', action='store_true',
                           help='preprocess again cases that were added before, from these files or others')
    unlabeled.set_defaults(run=_add_unlabeled)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.run(args)


if __name__ == '__main__':
    sys.exit(main())
