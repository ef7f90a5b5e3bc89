"""llmq: group-wise low-bit quantization of Hugging Face LLMs, with Triton kernels.

``import llmq`` registers the ``"llmq"`` quantization method with transformers, so
``AutoModelForCausalLM.from_pretrained(<llmq checkpoint>)`` rebuilds the quantized
modules. Import it before loading a checkpoint.
"""

from llmq._version import __version__  # noqa: F401  (modules inside llmq import it from llmq._version)

import importlib.machinery as _machinery  # noqa: E402
import importlib.util as _util  # noqa: E402
import os as _os  # noqa: E402
import sys as _sys  # noqa: E402


def _register_kernels_subpackage() -> None:
    """Make ``llmq.kernels`` importable when llmq runs from its source tree.

    The Triton kernels live in the repository's top-level ``kernels/`` folder, which has
    no ``__init__.py`` on purpose: a regular package there would be importable as the
    top-level ``kernels`` whenever the repository root is on ``sys.path`` (``python -m
    pytest``, a script run from the root), and would shadow Hugging Face's ``kernels``
    package, which transformers >= 5.25 imports. A wheel copies the folder into
    ``llmq/kernels/`` (``package_dir`` in setup.py), where the ordinary import finds it.
    A source checkout or an editable install has no ``llmq/kernels/``; there this
    registers ``llmq.kernels`` as a package whose modules are searched in ``<root>/kernels``.
    """
    if _os.path.isdir(_os.path.join(__path__[0], "kernels")):  # a wheel install
        return
    source = _os.path.join(_os.path.dirname(__path__[0]), "kernels")
    # check a kernel file, not just the folder: beside an installed llmq, "../kernels" would be
    # Hugging Face's package in site-packages
    if not _os.path.isfile(_os.path.join(source, "dequant_matmul.py")):
        raise ImportError(f"llmq's Triton kernels are missing: neither {__path__[0]}/kernels nor the source folder "
                          f"{source} holds them; reinstall llmq (pip install llmq, or pip install -e . in a checkout)")
    spec = _machinery.ModuleSpec("llmq.kernels", None, is_package=True)
    spec.submodule_search_locations = [source]
    module = _util.module_from_spec(spec)
    _sys.modules["llmq.kernels"] = module
    globals()["kernels"] = module


_register_kernels_subpackage()

# ``import llmq`` stays light (no torch, no transformers): the CLI's ``--help`` and the parsers of
# ``python -m llmq.cli.main`` import this package first, and torch + transformers cost seconds of CPU.
# The public names below are imported on first use; the transformers registration happens as soon as
# transformers itself is imported (immediately, if it already is), so ``import llmq`` before
# ``from_pretrained`` keeps working exactly as documented.
from llmq._transformers_hook import register_when_transformers_loads as _register_when_transformers_loads  # noqa: E402

_register_when_transformers_loads()

# public name -> module that defines it
_LAZY = {
    "ActivationRecipe": "llmq.recipes",
    "FORMAT_VERSION": "llmq.recipes",
    "KVRecipe": "llmq.recipes",
    "WeightMethod": "llmq.recipes",
    "WeightRecipe": "llmq.recipes",
    "ZeroPoint": "llmq.recipes",
    "QuantLinear": "llmq.nn",
    "set_backend": "llmq.nn",
    "QuantizeResult": "llmq.api",
    "is_quantized_checkpoint": "llmq.api",
    "load": "llmq.api",
    "quantize": "llmq.api",
    "QuantizedKVCache": "llmq.kv.cache",  # pulls in Triton kernels
    "QuantizedStaticCache": "llmq.kv.static_cache",
}

__all__ = sorted(_LAZY)


def __getattr__(name):
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value  # later lookups skip this function
        return value
    raise AttributeError(f"module 'llmq' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_LAZY))
