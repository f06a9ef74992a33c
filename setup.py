"""sae-universality: do different language models learn the same features?"""

from setuptools import find_packages, setup

setup(
    name="sae-universality",
    version="0.1.0",
    description=(
        "JAX engine to train toy models and sparse autoencoders, pair SAE features across two "
        "models, and measure feature-space similarity against null baselines."
    ),
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.11",
    packages=find_packages(
        include=["engine", "engine.*", "models", "models.*", "experiments", "experiments.*"]
    ),
    package_data={
        "engine": ["kernels/*.cc"],  # native kernels, compiled on first use (engine/kernels)
        "models": ["data/*.txt"],
        "experiments": ["configs/*.py", "pipeline/html_report_assets/*"],
    },
    # Lower bounds are the versions this was tested with (2026-11).
    install_requires=[
        "jax>=0.10.2",
        "flax>=0.12.8",
        "optax>=0.2.8",
        "orbax-checkpoint>=0.12.8",
        "absl-py>=2.5.1",
        "ml_collections>=1.1.0",  # experiment configs (experiments/configs/)
        "numpy>=2.4",
        "scipy>=1.17",
        "transformers>=5.24",
        "safetensors>=0.8.0",
        "matplotlib>=3.11",
        "tqdm>=4.70",
        # gs:// and other remote paths (also what orbax uses for them).
        "etils[epath]>=1.5",
    ],
    extras_require={
        # Forward passes of transformers language models (CPU wheel on these machines).
        "lm": ["torch==2.13.0"],
        "test": [
            "pytest>=9.2",
            "hypothesis>=6.170",
            # `-n 2`: two test workers (the suite is mostly single-threaded compiles and
            # entry-point start-ups, so two workers use both cores of the CI machine).
            "pytest-xdist>=3.8",
            "torch==2.13.0",
            # Lint and type check run by .ci/run (configured in pyproject.toml; pinned so a
            # new release cannot turn CI red on unchanged code).
            "ruff==0.17.6",
            "mypy==2.4.1",
            # Report tests drive Debian's chromium + chromedriver (apt; see .ci/run).
            "selenium>=4.50",
        ],
    },
)
