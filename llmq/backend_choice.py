"""The one backend chooser: which implementation runs each quantized op, and why.

Every quantized op kind has one ``BackendRegistry`` below, with its backends in order of
preference (fastest first; the pure-torch reference, which runs every case on every device, last)::

    op kind         module(s)                  automatic preference        forced only
    weight-matmul   QuantLinear                triton -> cpu -> torch      triton-interpret
    w8a8-matmul     W8A8Linear                 triton -> torch             triton-interpret
    experts         QuantExperts (MoE)         triton -> torch             triton-interpret
    kv-attention    quantized-KV decode step   triton -> torch             triton-interpret

A backend is an object with ``name: str`` and ``can_implement(spec) -> (ok, reason)`` (vLLM's
``MPLinearKernel`` seam) plus whatever its op calls to run it; ``spec`` is the op's frozen
description of one case (shapes, bits, device type, activation dtype). Backends register
themselves from their own modules (``registry.register(backend)``), so this module imports no
kernel.

Choosing (``BackendRegistry.choose(spec, forced)``):

* automatic: the first backend in preference order whose ``can_implement`` says yes. Each one
  that declines is logged once at INFO with its reason (``logging.getLogger("llmq")``), and so
  is the choice. If none fits, ``ValueError`` lists every reason.
* forced: ``forced=`` (a module's ``backend=`` / ``llmq.nn.set_backend``) or else the
  environment variable ``LLMQ_BACKEND``. A forced backend that cannot run the case raises
  ``ValueError`` with its reason: never a silent fallback. ``LLMQ_BACKEND`` is one knob for
  every op kind: an op kind that has no backend of that name chooses automatically (and logs
  so once); a name that no op kind has raises.
* ``triton-interpret`` (the one way to run the Triton kernels on the CPU, in Triton's
  interpreter, ``TRITON_INTERPRET=1`` set before llmq is imported; tests and debugging only)
  is never chosen automatically, only forced.

``explain(spec)`` gives every backend's verdict on a case without choosing, for debugging.
"""

from __future__ import annotations

import logging
import os
from typing import Any, Protocol

import torch

logger = logging.getLogger("llmq")

BACKEND_ENV = "LLMQ_BACKEND"
INTERPRET = "triton-interpret"
# environment variables that forced a backend before LLMQ_BACKEND covered every op kind: a user who
# still sets one must learn that it no longer does anything, not find the automatic choice running
REPLACED_ENVS = {"LLMQ_KV_ATTENTION": "kv-attention"}


class Backend(Protocol):
    name: str

    def can_implement(self, spec: Any) -> tuple[bool, str]: ...


# (op, backend, message) already logged: INFO once per distinct message, not once per layer
_logged: set[tuple[str, str, str]] = set()


def _log_once(op: str, name: str, message: str) -> None:
    # not while torch.compile traces (dynamo cannot trace logging); ``prepare`` makes the choice eagerly
    if (op, name, message) not in _logged and not torch.compiler.is_compiling():
        _logged.add((op, name, message))
        logger.info("llmq: %s backend %r %s", op, name, message)


class BackendRegistry:
    """The backends of one op kind, in order of preference, and the rule that picks one.

    Args:
        op: the op kind's name, used in logs and errors (``"weight-matmul"``, ...).
        preference: backend names tried automatically, best first. Names not registered yet
            (their module not imported) are skipped.
        forced_only: backend names that run only when forced (``triton-interpret``).
    """

    def __init__(self, op: str, preference: tuple[str, ...], forced_only: tuple[str, ...] = (INTERPRET,)) -> None:
        self.op = op
        self.preference = list(preference)
        self.forced_only = tuple(forced_only)
        self._backends: dict[str, Backend] = {}

    def register(self, backend: Backend, *, first: bool = True) -> None:
        """Add ``backend``. A name not in the preference order (a user's backend) is put first
        (``first=True``) or last; a name already registered raises."""
        if backend.name in self._backends:
            raise ValueError(f"a {self.op} backend named {backend.name!r} is already registered")
        self._backends[backend.name] = backend
        if backend.name not in self.preference and backend.name not in self.forced_only:
            self.preference.insert(0, backend.name) if first else self.preference.append(backend.name)

    def unregister(self, name: str) -> None:
        """Remove a backend added with ``register`` (tests, or a user replacing one)."""
        self._backends.pop(name)
        if name in self.preference and name not in _KNOWN_NAMES:
            self.preference.remove(name)

    def names(self) -> list[str]:
        """Registered names: automatic ones in preference order, then the forced-only ones."""
        order = [n for n in self.preference if n in self._backends]
        return order + [n for n in self._backends if n not in order]

    def get(self, name: str) -> Backend:
        if name not in self._backends:
            raise ValueError(f"unknown backend {name!r}: available backends are {self.names()} (for the {self.op})")
        return self._backends[name]

    def explain(self, spec: Any) -> list[tuple[str, bool, str]]:
        """``(name, ok, reason)`` of every registered backend for ``spec``, in ``names()`` order."""
        return [(name, *self._backends[name].can_implement(spec)) for name in self.names()]

    def choose(self, spec: Any, forced: str | None = None) -> Backend:
        """The backend that runs ``spec``: ``forced``, else ``LLMQ_BACKEND``, else the automatic choice.

        Raises ``ValueError`` with the reason when a forced backend cannot run ``spec``, with every
        reason when no backend can, and for an unknown forced name.
        """
        forced = forced or self._forced_by_env()
        if forced:
            backend = self.get(forced)
            ok, reason = backend.can_implement(spec)
            if not ok:
                raise ValueError(f"forced backend {forced!r} cannot run {spec} ({self.op}): {reason}")
            _log_once(self.op, forced, f"(forced): {reason}")
            return backend
        reasons = []
        for name in self.preference:
            backend = self._backends.get(name)
            if backend is None:
                continue
            ok, reason = backend.can_implement(spec)
            if ok:
                _log_once(self.op, name, f"chosen: {reason}")
                return backend
            _log_once(self.op, name, f"declined: {reason}")
            reasons.append(f"{name}: {reason}")
        raise ValueError(f"no {self.op} backend can run {spec}: " + "; ".join(reasons))

    def _forced_by_env(self) -> str | None:
        """``LLMQ_BACKEND`` when it names one of this op kind's backends, else ``None``."""
        name = env_backend()
        if name is None or name in self._backends:
            return name
        _log_once(self.op, name, f"is not a {self.op} backend ({BACKEND_ENV}={name}): choosing automatically "
                                 f"among {self.names()}")
        return None


def env_backend() -> str | None:
    """The backend ``LLMQ_BACKEND`` forces (``None`` when unset or empty).

    Raises ``ValueError`` for a name that no op kind has, and when a replaced variable
    (``LLMQ_KV_ATTENTION``) is set.
    """
    for old, op in REPLACED_ENVS.items():
        if os.environ.get(old):
            raise ValueError(f"{old} is no longer read: set {BACKEND_ENV} instead (it forces the {op} backend "
                             f"too; on CPU the Triton kernel is {BACKEND_ENV}={INTERPRET}), and unset {old}")
    name = os.environ.get(BACKEND_ENV) or None
    if name is not None and name not in known_names():
        raise ValueError(f"{BACKEND_ENV}={name!r} names no backend: choose one of {sorted(known_names())}")
    return name


def known_names() -> set[str]:
    """Every backend name of every op kind (preferences, forced-only names and registered ones)."""
    return {n for r in REGISTRIES.values() for n in (*r.preference, *r.forced_only, *r._backends)}


def preferences() -> dict[str, list[str]]:
    """``{op kind: registered backend names}``, automatic ones in preference order, then forced-only ones."""
    return {op: r.names() for op, r in REGISTRIES.items()}


def triton_device_check(device_type: str, interpret: bool) -> tuple[bool, str] | None:
    """The device half of a Triton backend's ``can_implement``, the same for every op kind.

    ``interpret=False`` (``triton``): a verdict ``(False, reason)`` unless ``device_type`` is
    ``"cuda"``, else ``None`` (the backend checks the rest). ``interpret=True``
    (``triton-interpret``): the whole verdict, CPU tensors under ``TRITON_INTERPRET=1``.
    """
    if not interpret:
        if device_type == "cuda":
            return None
        return False, (f"needs a CUDA device, got {device_type!r} (to run the Triton kernels on CPU for testing, "
                       f"set TRITON_INTERPRET=1 and force backend={INTERPRET!r})")
    from llmq.kernels.interpreter import interpreting  # imports triton: only when a Triton backend asks

    if device_type != "cpu":
        return False, f"runs on CPU only, got {device_type!r} (use backend='triton' on CUDA)"
    if not interpreting():
        return False, "needs TRITON_INTERPRET=1 set before llmq is imported"
    return True, "Triton interpreter on CPU (testing only, slow)"


WEIGHT_MATMUL = BackendRegistry("weight-matmul", ("triton", "cpu", "torch"))
W8A8_MATMUL = BackendRegistry("w8a8-matmul", ("triton", "torch"))
EXPERTS = BackendRegistry("experts", ("triton", "torch"))
KV_ATTENTION = BackendRegistry("kv-attention", ("triton", "torch"))
REGISTRIES = {r.op: r for r in (WEIGHT_MATMUL, W8A8_MATMUL, EXPERTS, KV_ATTENTION)}
_KNOWN_NAMES = frozenset(n for r in REGISTRIES.values() for n in (*r.preference, *r.forced_only))


class ChoosesBackend:
    """Mixin for a module whose backend is chosen per (device type, activation dtype) on first use, then cached.

    The class sets ``BACKENDS`` (its op kind's registry) and defines ``spec(x)``; ``__init__`` sets
    ``backend_name`` (a forced name, or ``None``) and ``_backend = {}``.
    """

    BACKENDS: BackendRegistry

    def backend_for(self, x: torch.Tensor):
        key = (x.device.type, x.dtype)
        backend = self._backend.get(key)
        if backend is None:
            backend = self._backend[key] = self.BACKENDS.choose(self.spec(x), forced=self.backend_name)
        return backend

    def set_backend(self, name: str | None) -> None:
        """Force a backend by name (``None`` = automatic choice); takes effect at the next forward."""
        self.backend_name = name
        self._backend.clear()
