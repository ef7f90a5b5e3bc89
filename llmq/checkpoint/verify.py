"""Check a checkpoint's safetensors files before loading, so damage gives a clear error.

Without this, a truncated shard or a tensor missing from it can surface as an
obscure error deep inside ``from_pretrained`` — or, worse, as a buffer left
uninitialised.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any


def read_safetensors_header(path: str | Path) -> dict[str, Any]:
    """Tensor table of a safetensors file, after checking the file is complete.

    Raises ``ValueError`` naming the file if the header is unreadable or the file is
    shorter than the tensors it declares (truncated download or copy).
    """
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise ValueError(f"{path}: {size} bytes, too short to be a safetensors file (truncated?)")
        (n,) = struct.unpack("<Q", head)
        if n > size - 8:
            raise ValueError(f"{path}: header claims {n} bytes but the file has {size}; the file is truncated or corrupt")
        try:
            header = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise ValueError(f"{path}: unreadable safetensors header; the file is corrupt") from None
    header.pop("__metadata__", None)
    end = max((t["data_offsets"][1] for t in header.values()), default=0)
    if 8 + n + end != size:
        raise ValueError(
            f"{path}: tensors need {8 + n + end} bytes but the file has {size}; the file is truncated or corrupt — "
            f"re-copy or re-create the checkpoint"
        )
    return header


def _expected_tensors(name: str, cfg: dict[str, Any]) -> list[str]:
    if cfg.get("kind") == "quant_experts":  # two stacks of per-expert QuantLinear buffers
        return [key for stack in ("gate_up", "down")
                for key in _expected_tensors(f"{name}.{stack}", {**cfg, "kind": "quant_linear"})]
    keys = [f"{name}.qweight", f"{name}.scales"] if cfg.get("kind") == "quant_linear" else []
    if cfg.get("kind") == "quant_linear" and not cfg.get("symmetric", True):
        keys.append(f"{name}.{_zero_tensor(cfg)}")
    if cfg.get("kind") == "quant_linear" and cfg.get("levels", "uniform") != "uniform":
        keys.append(f"{name}.codebook")
    return keys


def _zero_tensor(cfg: dict[str, Any]) -> str:
    """Name of an asymmetric QuantLinear's zero-point tensor: uint8 ``qzeros`` or float ``zeros``."""
    return "zeros" if cfg.get("zero_point", "int") == "float" else "qzeros"


def verify_checkpoint(files: list[str | Path], quantization_config: dict[str, Any]) -> None:
    """Check every shard is complete and every quantized module's tensors are present.

    Args:
        files: the checkpoint's ``*.safetensors`` shards.
        quantization_config: the validated llmq block of ``config.json``.
    """
    files = [Path(f) for f in files]
    if not files:
        raise ValueError("the checkpoint has no *.safetensors files")
    bad = [f for f in files if f.suffix != ".safetensors"]
    if bad:
        raise ValueError(f"llmq loads only safetensors checkpoints (never pickles); got {[str(b) for b in bad]}")
    present: dict[str, dict] = {}
    for f in files:
        present.update(read_safetensors_header(f))
    missing = []
    for name, cfg in quantization_config["modules"].items():
        missing += [k for k in _expected_tensors(name, cfg) if k not in present]
    if missing:
        more = f" (and {len(missing) - 5} more)" if len(missing) > 5 else ""
        raise ValueError(
            f"checkpoint does not match its quantization_config: missing tensors {missing[:5]}{more}; "
            f"the shards and config.json come from different runs or were damaged"
        )
    for name, cfg in quantization_config["modules"].items():
        if cfg.get("kind") == "quant_linear":
            _check_quant_linear(name, cfg, present)
        elif cfg.get("kind") == "quant_experts":
            e, h, i = cfg["num_experts"], cfg["hidden_size"], cfg["intermediate_size"]
            for stack, k, n in (("gate_up", h, 2 * i), ("down", i, h)):
                _check_quant_linear(f"{name}.{stack}", {**cfg, "in_features": k, "out_features": n}, present,
                                    leading=(e,))


def _check_quant_linear(name: str, cfg: dict[str, Any], present: dict[str, dict], leading: tuple[int, ...] = ()) -> None:
    """Shapes and dtypes of one QuantLinear's tensors (``leading``: a stack's expert axis ``[E]``)."""
    from llmq.quant.packing import packed_rows
    from llmq.quant.primitives import num_groups

    k, n = cfg["in_features"], cfg["out_features"]
    g = num_groups(k, cfg["group_size"])
    floats = ("F16", "BF16", "F32")
    expected = {"qweight": (("I32",), [*leading, packed_rows(k, cfg["bits"]), n]),
                "scales": (floats, [*leading, g, n])}
    if not cfg["symmetric"]:
        zero = _zero_tensor(cfg)
        expected[zero] = (("U8",) if zero == "qzeros" else floats, [*leading, g, n])
    if cfg.get("levels", "uniform") != "uniform":  # non-uniform levels: [T, 2**bits], T = 1 or N (kmeans)
        expected["codebook"] = (floats, [*leading, n if cfg["levels"] == "kmeans" else 1, 1 << cfg["bits"]])
    for tensor, (dtypes, shape) in expected.items():
        entry = present[f"{name}.{tensor}"]
        if entry["shape"] != shape or entry["dtype"] not in dtypes:
            raise ValueError(
                f"{name}.{tensor} is {entry['dtype']} {entry['shape']} in the shards but its recipe "
                f"({cfg['bits']}-bit, group {cfg['group_size']}, {k}->{n}) needs {'/'.join(dtypes)} {shape}; "
                f"config.json and the weights do not match"
            )
