"""Write a quantized model as an llmq checkpoint, atomically."""

from __future__ import annotations

import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from torch import nn


def _is_within(a: Path, b: Path) -> bool:
    return a == b or b in a.parents


def check_output_dir(out_dir: str | Path, force: bool, source_dir: str | Path | None = None) -> Path:
    """Resolve ``out_dir`` and refuse unsafe targets *before* any work starts.

    Refuses: the source model's folder or anything inside/around it; an existing
    file; an existing non-empty folder unless ``force``.
    """
    out = Path(out_dir).expanduser().resolve()
    if source_dir is not None:
        src = Path(source_dir).expanduser().resolve()
        if _is_within(out, src) or _is_within(src, out):
            raise ValueError(f"output {out} overlaps the source model folder {src}; choose another --out")
    if out.is_file():
        raise FileExistsError(f"output {out} is an existing file; choose another --out")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise FileExistsError(f"output {out} exists and is not empty; pass --force to replace it")
    return out


def save_quantized(
    model: nn.Module,
    tokenizer,
    out_dir: str | Path,
    quantization_config: dict[str, Any],
    force: bool = False,
    source_dir: str | Path | None = None,
    max_shard_size: str = "2GB",
) -> Path:
    """Save ``model`` (quantized modules swapped in) + tokenizer to ``out_dir``.

    Everything is written to a hidden temporary folder beside ``out_dir`` and
    renamed into place at the end, so an interrupted run leaves no partial output;
    with ``force`` an existing output is replaced only after the new one is complete.
    """
    out = check_output_dir(out_dir, force, source_dir)
    with atomic_output_dir(out, force) as tmp:
        model.config.quantization_config = quantization_config
        # tensors under the model's own module names (transformers would otherwise revert its checkpoint
        # conversions, e.g. rename Mixtral's ``mlp`` to ``block_sparse_moe``): the quantization_config lists
        # modules by these names, and the checker and ``llmq inspect`` read the files by them
        model.save_pretrained(tmp, safe_serialization=True, max_shard_size=max_shard_size,
                              save_original_format=False)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
    return out


@contextmanager
def atomic_output_dir(out: Path, force: bool) -> Iterator[Path]:
    """Yield a hidden temporary folder beside ``out``; when the block succeeds it becomes ``out``.

    An existing ``out`` (allowed by ``check_output_dir``) is replaced only after the new folder is
    complete, and put back if the rename fails; on any error nothing of the new output remains.
    """
    check_output_dir(out, force)
    out.parent.mkdir(parents=True, exist_ok=True)
    tag = uuid.uuid4().hex[:8]
    tmp = out.parent / f".{out.name}.llmq-tmp-{tag}"
    old = out.parent / f".{out.name}.llmq-old-{tag}"
    try:
        tmp.mkdir()
        yield tmp
        if out.exists():
            out.rename(old)
        try:
            tmp.rename(out)
        except BaseException:
            if old.exists():  # put the previous output back
                old.rename(out)
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(old, ignore_errors=True)
