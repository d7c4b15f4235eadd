from setuptools import find_packages, setup

setup(
    name='nnunet-plugins',
    version='0.1.0',
    description='MedNeXt and other modern 3D segmentation networks as nnU-Net v2 trainers, without a fork',
    long_description=open('README.md', encoding='utf-8').read(),
    long_description_content_type='text/markdown',
    python_requires='>=3.10',
    # every package below nnunet_plugins; the plans presets live at the top of the repository, installed inside it
    packages=find_packages(include=['nnunet_plugins', 'nnunet_plugins.*']) + ['nnunet_plugins.plans'],
    package_dir={'nnunet_plugins.plans': 'plans'},
    package_data={'nnunet_plugins.plans': ['*.json', 'README.md']},
    install_requires=[
        # 2.8 brought nnUNet_extTrainer and the 2.7 trainer signature; 2.9 may change the trainer
        # internals the plugin overrides, so it is admitted only once tested (see README)
        'nnunetv2>=2.8.1,<2.9',
        'torch',
        'torchvision',
        'SimpleITK',
        'batchgenerators',
        'dynamic-network-architectures',
        'matplotlib',
        'numpy',
        'scipy',
        'packaging',
        # Swin UNETR is built from MONAI's Swin transformer blocks, `nnunet-plugins evaluate` measures NSD and HD95
        # with MONAI's metric functions, and the benchmark has MONAI's networks as peers; tested with 1.6.1, see README
        'monai>=1.4,<1.7',
    ],
    extras_require={'test': ['pytest']},
    entry_points={'console_scripts': ['nnunet-plugins=nnunet_plugins.cli:main']},
)
