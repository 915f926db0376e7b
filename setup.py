"""mae_jax: Masked Autoencoders (He et al. 2021) in JAX/Flax.

Version ranges are the ones tested (lower bound: tested; upper bound: the next
release line, which may break APIs this project uses).
"""
from setuptools import find_packages, setup

INSTALL_REQUIRES = [
    'jax>=0.10.2,<0.13',
    'flax>=0.12.8,<0.13',
    'optax>=0.2.8,<0.3',
    'orbax-checkpoint>=0.12.8,<0.13',
    'ml_collections>=1.1.0,<1.2',
    'absl-py>=2.1,<3',
    'numpy>=2.0,<2.5',
    'pillow>=11.0,<14',
    'matplotlib>=3.9,<3.12',
    'tqdm>=4.66,<5',
    'tensorboardX>=2.6,<2.7',
    'scikit-image>=0.25,<0.27',
    'tensorflow-cpu>=2.21.0,<2.22',
    'tensorflow-datasets>=4.9.10,<4.10',
]

# torch 2.14.1 + torchvision 0.29.1: the pair whose import works together on
# the project's CPU machines (PyPI's torchvision fails beside torch 2.13.0).
TORCH_REQUIRES = [
    'torch==2.14.1',
    'torchvision==0.29.1',
    'safetensors>=0.4,<0.9',
]

TEST_REQUIRES = TORCH_REQUIRES + [
    'pytest>=8.0,<10',
    'pytest-xdist>=3.5,<4',
    'timm>=1.0.15,<1.1',
    'nbclient>=0.10,<0.12',
    'ipykernel>=6.29,<8',
    'nbformat>=5.10,<6',
    # The PyTorch peer of benchmarks/pretrain_throughput.py (tested 5.17-5.24).
    'transformers>=5.17,<5.25',
]

setup(
    name='mae_jax',
    version='0.1.0',
    description='Masked Autoencoders (MAE) in JAX/Flax, faithful to the '
                'official release and checkpoint-compatible with it.',
    packages=find_packages(include=['mae_jax', 'mae_jax.*']),
    python_requires='>=3.10',
    install_requires=INSTALL_REQUIRES,
    extras_require={'torch': TORCH_REQUIRES, 'test': TEST_REQUIRES},
)
