"""tf_psp: Parameterized Structured Pruning for Keras 3."""

from setuptools import find_packages, setup

INSTALL_REQUIRES = [
    "tensorflow-cpu==2.21.0",
    "keras==3.15.1",
    "numpy>=1.26,<3",
    "absl-py==2.5.1",
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
}

setup(
    name="tf_psp",
    version="0.1.0",
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
