"""Register llmq with transformers when transformers is imported, not when llmq is.

``import llmq`` must make ``from_pretrained`` understand llmq checkpoints, but importing
transformers (and torch) costs seconds of CPU that ``llmq --help`` or ``import llmq.recipes``
should not pay. So ``llmq/__init__`` calls ``register_when_transformers_loads()``:

* transformers already imported → register now;
* otherwise → a ``sys.meta_path`` finder waits for the top-level ``transformers`` import,
  lets it run, and registers right after it, before the importing statement returns.
  The finder removes itself when transformers actually executes (a bare
  ``importlib.util.find_spec("transformers")`` availability check, as other libraries do,
  leaves it in place).
"""

from __future__ import annotations

import importlib.abc
import sys


def _register() -> None:
    from llmq.integration.transformers import register

    register()


class _AfterTransformersImport(importlib.abc.MetaPathFinder):
    """Wraps the loader of ``transformers`` so that ``_register`` runs after the module executes."""

    def find_spec(self, fullname, path, target=None):
        if fullname != "transformers":
            return None
        for finder in sys.meta_path:
            if finder is self:
                continue
            find = getattr(finder, "find_spec", None)
            spec = find(fullname, path, target) if find else None
            if spec is not None:
                break
        else:
            return None  # not installed: the import fails as it would without llmq
        loader = spec.loader
        exec_module = loader.exec_module

        def exec_then_register(module):
            if self in sys.meta_path:
                sys.meta_path.remove(self)  # transformers runs once per process
            exec_module(module)
            _register()

        loader.exec_module = exec_then_register  # this loader object serves only this one module
        return spec


def register_when_transformers_loads() -> None:
    if "transformers" in sys.modules:
        _register()
    elif not any(isinstance(f, _AfterTransformersImport) for f in sys.meta_path):
        sys.meta_path.insert(0, _AfterTransformersImport())
