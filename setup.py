"""Package discovery only; all metadata lives in pyproject.toml.

Triton kernels live in the repository's top-level ``kernels/`` folder but ship
inside the wheel as ``llmq.kernels``: a top-level ``kernels`` module name is
owned by Hugging Face's own ``kernels`` package, so we never install one.
"""
from setuptools import find_packages, setup

setup(
    packages=find_packages(include=["llmq", "llmq.*"]) + ["llmq.kernels"],
    package_dir={"llmq.kernels": "kernels"},
)
