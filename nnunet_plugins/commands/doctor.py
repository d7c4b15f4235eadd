"""``nnunet-plugins doctor``: check what breaks nnU-Net plugins, and say how to fix each problem."""
import os
from dataclasses import dataclass
from importlib import metadata
from typing import Callable

from nnunet_plugins import ext_trainer_folder
from nnunet_plugins.workspace import NNUNET_FOLDERS

OK, WARN, FAIL = 'ok', 'warn', 'FAIL'


@dataclass
class Finding:
    status: str
    message: str
    fix: str = ''


def check_nnunet_version() -> Finding:
    from packaging.requirements import Requirement
    required = next(Requirement(r) for r in metadata.requires('nnunet-plugins') if r.startswith('nnunetv2'))
    try:
        installed = metadata.version('nnunetv2')
    except metadata.PackageNotFoundError:
        return Finding(FAIL, 'nnunetv2 is not installed', f'pip install "{required}"')
    if not required.specifier.contains(installed, prereleases=True):
        return Finding(FAIL, f'nnunetv2 {installed} is outside the tested range {required.specifier}',
                       f'pip install "{required}"')
    return Finding(OK, f'nnunetv2 {installed} (tested range {required.specifier})')


def check_torchvision() -> Finding:
    try:
        import torchvision
        import timm  # noqa: F401  (nnU-Net's trainer search imports it, and it imports torchvision)
    except Exception as error:  # a broken binary raises all kinds of errors, not only ImportError
        return Finding(FAIL, f'torchvision does not import ({type(error).__name__}: {error}); nnU-Net\'s trainer '
                             f'search imports it for every -tr lookup',
                       'install torch and torchvision as a matching pair: pip install --force-reinstall torch '
                       'torchvision')
    import torch
    return Finding(OK, f'torch {torch.__version__} and torchvision {torchvision.__version__} import')


def check_folder_variable(variable: str) -> Finding:
    path = os.environ.get(variable)
    fix = f'export {variable}=/path/to/{variable}  (and create that folder)'
    if not path:
        return Finding(FAIL, f'{variable} is not set', fix)
    if os.path.exists(path) and not os.path.isdir(path):
        return Finding(FAIL, f'{variable}={path} is a file, not a folder',
                       f'point {variable} to a folder, or move the file away and mkdir -p {path}')
    if not os.path.isdir(path):
        return Finding(FAIL, f'{variable}={path} does not exist', f'mkdir -p {path}')
    if not os.access(path, os.W_OK):
        return Finding(FAIL, f'{variable}={path} is not writable', f'make {path} writable or point {variable} '
                                                                   f'to a writable folder')
    return Finding(OK, f'{variable}={path}')


def check_ext_trainer() -> Finding:
    folder = ext_trainer_folder()
    entries = [p for p in os.environ.get('nnUNet_extTrainer', '').split(os.pathsep) if p]
    fix = f'export nnUNet_extTrainer={folder}'
    if not any(os.path.realpath(p) == os.path.realpath(folder) for p in entries):
        return Finding(FAIL, 'nnUNet_extTrainer does not contain the plugin\'s trainer folder, so nnU-Net '
                             'cannot find the plugin trainers', fix)
    from nnunet_plugins.commands.lookup import nnunet_search
    from nnunet_plugins.registry import plugin_trainers
    probe = plugin_trainers()[0]
    try:
        found = nnunet_search(probe.__name__)  # as nnUNetv2_train searches with the user's environment
    except Exception as error:
        return Finding(FAIL, f'nnU-Net\'s trainer search fails: {type(error).__name__}: {error}', fix)
    if found is not probe:
        return Finding(FAIL, f'nnU-Net finds another class named {probe.__name__} ({found.__module__}) '
                             f'before the plugin\'s', 'remove the other folder from nnUNet_extTrainer')
    return Finding(OK, f'nnU-Net finds the plugin trainers in {folder}')


def check_cuda() -> Finding:
    import torch
    if not torch.cuda.is_available():
        return Finding(WARN, 'no CUDA GPU: training runs on the CPU (-device cpu), without AMP, and is slow',
                       'for real training use a machine with an NVIDIA GPU and a CUDA build of torch')
    name = torch.cuda.get_device_name(0)
    bf16 = 'bf16 supported' if torch.cuda.is_bf16_supported() else 'no bf16'
    return Finding(OK, f'CUDA GPU {name}: nnU-Net trains with fp16 AMP ({bf16})')


CHECKS: tuple[Callable[[], Finding], ...] = (
    check_nnunet_version,
    check_torchvision,
    *[(lambda v=variable: check_folder_variable(v)) for variable in NNUNET_FOLDERS],
    check_ext_trainer,
    check_cuda,
)


def run_checks() -> int:
    """Print every finding; return 1 when any check failed, else 0."""
    findings = [check() for check in CHECKS]
    for finding in findings:
        print(f'[{finding.status:^4}] {finding.message}')
        if finding.fix and finding.status != OK:
            print(f'       fix: {finding.fix}')
    failed = sum(f.status == FAIL for f in findings)
    print(f'\n{failed} problem(s) found' if failed else '\nall checks passed')
    return 1 if failed else 0
