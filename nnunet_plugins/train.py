"""``[torchrun [torchrun's options]] python -m nnunet_plugins.train DATASET CONFIGURATION FOLD [nnUNetv2_train's
options]``: nnUNetv2_train, in a torchrun group across nodes when started by torchrun
(:mod:`nnunet_plugins.commands.train`)."""
from nnunet_plugins.commands.train import main

if __name__ == '__main__':
    main()
