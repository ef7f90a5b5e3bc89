"""Package discovery only; all other metadata lives in pyproject.toml.

The Triton kernels live in the repository's top-level ``kernels/`` folder but ship and
import only as ``llmq.kernels``. Hugging Face's ``kernels`` package owns the top-level
name, and transformers >= 5.25 imports it, so the folder must never be importable as
``kernels``:

- ``kernels/`` has no ``__init__.py``. With the repository root on ``sys.path`` (``python -m
  pytest``, a script run from the root) Python then treats it as at most a namespace
  portion, and any regular ``kernels`` package installed (Hugging Face's) wins over it.
- A wheel maps the folder onto ``llmq/kernels/`` (``package_dir`` below), where it imports
  as an implicit namespace subpackage of ``llmq``; no top-level ``kernels`` is installed.
- A source checkout or an editable install has no ``llmq/kernels/``: ``llmq/__init__.py``
  registers ``llmq.kernels`` with ``<root>/kernels`` as its search path
  (``_register_kernels_subpackage``). setuptools' own editable finder cannot map a
  subpackage without ``__init__.py``, which is why llmq does it itself.

``tests/test_packaging.py`` checks all three.
"""
from setuptools import find_packages, setup

setup(
    packages=find_packages(include=["llmq", "llmq.*"]) + ["llmq.kernels"],
    package_dir={"llmq.kernels": "kernels"},
)
