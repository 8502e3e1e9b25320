"""p5jax: P5 (Recommendation as Language Processing) in JAX/Flax, T5X/SeqIO style.

Ranges here are what the code supports; `requirements.txt` pins the exact set
verified together on Python 3.11 (CPU) for reproducible installs.
"""
import setuptools

INSTALL_REQUIRES = [
    "jax>=0.10.2,<0.11",
    "jaxlib>=0.10.2,<0.11",
    "flax>=0.12.8,<0.13",
    "optax>=0.2.8,<0.3",
    "orbax-checkpoint>=0.12.8,<0.13",
    "seqio==0.0.20",
    "clu>=0.0.12",
    "tensorflow>=2.21,<2.22",
    "tensorflow-text>=2.21,<2.22",
    "tensorflow-datasets>=4.9.10,<4.10",
    "gin-config>=0.5.0",
    "sentencepiece>=0.2.3",
    "absl-py>=2.1",
    "numpy>=1.26",
    "scikit-learn>=1.5",
    "rouge-score>=0.1.2",
    "sacrebleu>=2.4",
    "matplotlib>=3.8",
    "safetensors>=0.4",
    "pyarrow>=15",
    "tqdm>=4.66",
    # clu.metric_writers writes TensorBoard summaries through it.
    "tensorboard>=2.21,<2.22",
]

EXTRAS_REQUIRE = {
    "test": [
        "pytest>=8",
        # CPU build (a CUDA build is several GB); used only by parity tests
        # and benchmarks that compare against Hugging Face transformers.
        "torch==2.13.0",
        "transformers>=5,<6",
        "nbclient>=0.10",
        "nbformat>=5.10",
        "ipykernel>=6",
    ],
}

setuptools.setup(
    name="p5jax",
    version="0.1.0",
    description="P5 recommendation-as-language-processing in JAX/Flax (T5X/SeqIO style)",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    packages=setuptools.find_packages(include=["p5jax", "p5jax.*", "tasks", "tasks.*"]),
    package_data={"": ["*.gin"]},
    python_requires=">=3.11",
    install_requires=INSTALL_REQUIRES,
    extras_require=EXTRAS_REQUIRE,
)
