"""tf_psp: Parameterized Structured Pruning for Keras 3."""

import re

from setuptools import find_packages, setup

# The version lives in one place, tf_psp/__init__.py (`tf-psp --version` prints it).
with open("tf_psp/__init__.py", encoding="utf-8") as init:
    VERSION = re.search(r'^__version__ = "([^"]+)"', init.read(), re.M).group(1)

INSTALL_REQUIRES = [
    "tensorflow-cpu==2.21.0",
    "keras==3.15.1",
    "numpy>=1.26,<3",
    "absl-py==2.5.1",
    # keras.callbacks.TensorBoard needs it and tensorflow-cpu does not bring it
    "tensorboard==2.21.0",
]

EXTRAS = {
    "test": [
        "pytest==9.2.0",
        "pytest-xdist==3.8.0",
        "ruff==0.17.5",
        "hypothesis==6.170.17",
        "mlxtend==0.25.0",
        "scikit-learn==1.9.1",
    ],
    "bench": [
        "tf2onnx==1.17.0",
        "onnx==1.23.2",
        "onnxruntime==1.32.0",
        "ai-edge-litert==2.3.0",
        "matplotlib==3.11.2",
        "mlxtend==0.25.0",
    ],
    "jax": ["jax==0.10.2", "jaxlib==0.10.2"],
    # keras-hub's requirements other than TensorFlow. keras-hub itself is installed apart with
    # `pip install --no-deps keras-hub==0.32.0`: it requires tensorflow-text, which pulls the full
    # `tensorflow` wheel over `tensorflow-cpu`, and pip cannot leave out one dependency of an
    # extra. Its image backbones import and run without tensorflow-text.
    "hub": [
        "kagglehub==1.0.2",
        "kagglesdk==0.1.28",
        "regex==2026.11.19",
        "rich==15.0.0",
        "packaging==26.4",
        "tokenizers==0.23.3",
        "sentencepiece==0.2.3",
    ],
}

setup(
    name="tf_psp",
    version=VERSION,
    description=(
        "Parameterized Structured Pruning (PSP) for Keras 3: learn which "
        "channels, filters, columns or layers to drop, then physically shrink."
    ),
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.11",
    packages=find_packages(include=["tf_psp", "tf_psp.*"]),
    install_requires=INSTALL_REQUIRES,
    extras_require=EXTRAS,
    entry_points={"console_scripts": ["tf-psp = tf_psp.cli:main"]},
    license="Apache-2.0",
)
