"""Installs the `moe` library, the `seqio_tasks` registries and the gin configs.

The versions are pinned to a set that was installed together on a fresh machine and passed the
test suite (see WORKSPACE.md); `requirements.lock` freezes the full transitive set.
"""

from setuptools import find_packages, setup

INSTALL_REQUIRES = [
    "jax==0.10.2",
    "jaxlib==0.10.2",
    "flax==0.12.8",
    "optax==0.2.8",
    "orbax-checkpoint==0.12.8",
    "tensorstore==0.1.86",
    "safetensors==0.8.0",
    "seqio==0.0.20",
    "tensorflow-cpu==2.21.0",
    "tensorflow-text==2.21.1",
    "tensorflow-datasets==4.9.10",
    "gin-config==0.5.0",
    "absl-py==2.5.1",
    "clu==0.0.12",
    "tensorboard==2.21.0",
    "sentencepiece==0.2.3",
    "numpy==2.4.6",
    "scipy==1.17.1",
    "scikit-learn==1.9.1",
    "matplotlib==3.11.2",
]

# The gin files are data in two folders without `__init__.py`; setuptools treats such folders as
# namespace packages, so they are listed as packages (else it warns that their files would be
# ignored). `package_dir` says every package sits at the project root: an editable install is
# then a plain path entry instead of an import hook, which setuptools installs without notices.
GIN_FOLDERS = ["gin_configs.models", "gin_configs.runs", "gin_configs.experiments"]

setup(
    name="moe",
    version="0.1.0",
    description="JAX/Flax mixture-of-experts research codebase (T5X/flaxformer conventions).",
    python_requires=">=3.10",
    package_dir={"": "."},
    packages=[
        *find_packages(include=["moe", "moe.*", "seqio_tasks", "seqio_tasks.*", "gin_configs"]),
        *GIN_FOLDERS,
    ],
    # The CPU kernels ship as C++ source, compiled on first use (`moe.cpu_kernels`).
    package_data={"moe": ["kernels/*.cc"], **{folder: ["*.gin"] for folder in GIN_FOLDERS}},
    include_package_data=True,
    install_requires=INSTALL_REQUIRES,
    extras_require={
        "test": ["pytest==9.2.0", "pytest-xdist==3.8.0", "ruff==0.17.6"],
        # Compiling for TPU slices ahead of time on any machine (`moe.plan`, tests/tpu), and
        # running on a TPU VM: libtpu at the version the pinned JAX expects.
        "tpu": ["jax[tpu]==0.10.2", "libtpu==0.0.42.1"],
    },
)
