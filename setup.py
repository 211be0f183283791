"""fedprune_jax: federated pruning of Conformer ASR models in JAX/Flax."""

import setuptools

setuptools.setup(
  name="fedprune_jax",
  version="0.1.0",
  description="Federated pruning of Conformer speech recognizers in JAX/Flax",
  long_description=open("README.md", encoding="utf-8").read(),
  long_description_content_type="text/markdown",
  python_requires=">=3.11",
  # The named configs stay in experiments/configs/ and ship inside the package as
  # fedprune_jax.configs (found by fedprune_jax.config.config_dir in an installed copy).
  packages=setuptools.find_packages(include=["fedprune_jax", "fedprune_jax.*"])
  + ["fedprune_jax.configs"],
  package_dir={"fedprune_jax.configs": "experiments/configs"},
  install_requires=[
    # jax 0.10.2 is the newest that supports Python 3.11 (see README).
    "jax>=0.10.2",
    "jaxlib>=0.10.2",
    "flax>=0.12.8",
    "optax>=0.2.8",
    "orbax-checkpoint>=0.12.8",
    "drjax>=0.2.1",
    "ml-collections>=1.1.0",
    "numpy>=2.0",
    "scipy>=1.13",
    "jiwer>=4.0.0",
    "soundfile>=0.12",
    "espeakng-loader>=0.2.4",
    "wordfreq>=3.1",
    "tqdm>=4.66",
    "psutil>=5.9",
  ],
  extras_require={
    "tfds": ["tensorflow-datasets>=4.9.10", "tensorflow-cpu>=2.16"],
    "fedjax": ["fedjax==0.0.17"],
    "tensorboard": ["tensorboardX>=2.6"],
    "report": ["matplotlib>=3.8"],
    "dev": ["pytest>=8", "pytest-xdist>=3.5", "hypothesis>=6.100", "ruff>=0.15"],
  },
  entry_points={"console_scripts": ["fedprune=fedprune_jax.cli:main"]},
)
