"""Write a quantized model as an llmq checkpoint, atomically.

Every output folder ``OUT`` is built in a hidden sibling ``.OUT.llmq-tmp-<pid>-<tag>`` and renamed
into place when complete (``atomic_output_dir``). A run killed outright (SIGKILL, power loss) cannot
remove its temporary folder, so the next run for the same ``OUT`` does (``clean_stale_temporaries``),
naming what it removes; the pid in the name keeps it from touching a concurrent run's folder.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from torch import nn

log = logging.getLogger("llmq")
_TEMPORARY = re.compile(r"^\.(?P<name>.+)\.llmq-(?P<kind>tmp|old)-(?:(?P<pid>\d+)-)?[0-9a-f]{8}$")


# files that mark a folder as a model or export written by llmq / transformers (what --force may replace):
# a Hugging Face model folder (config.json) or an `llmq export --format onnx` folder (llmq_onnx.json)
MODEL_FOLDER_MARKERS = ("config.json", "llmq_onnx.json")


def _is_within(a: Path, b: Path) -> bool:
    return a == b or b in a.parents


def check_output_dir(out_dir: str | Path, force: bool, source_dir: str | Path | None = None) -> Path:
    """Resolve ``out_dir`` and refuse unsafe targets *before* any work starts.

    Refuses: the source model's folder or anything inside/around it; an existing
    file; an existing non-empty folder unless ``force``; with ``force``, a non-empty folder
    that is not a model folder (none of ``MODEL_FOLDER_MARKERS``): ``--force`` replaces an earlier output,
    never a folder of other files. Stale temporary folders of earlier killed runs beside
    ``out`` are cleaned up first (``clean_stale_temporaries``).
    """
    out = Path(out_dir).expanduser().resolve()
    if source_dir is not None:
        src = Path(source_dir).expanduser().resolve()
        if _is_within(out, src) or _is_within(src, out):
            raise ValueError(f"output {out} overlaps the source model folder {src}; choose another --out")
    if out.is_file():
        raise FileExistsError(f"output {out} is an existing file; choose another --out")
    clean_stale_temporaries(out)
    if out.is_dir() and any(out.iterdir()):
        if not force:
            raise FileExistsError(f"output {out} exists and is not empty; pass --force to replace it")
        if not any((out / marker).is_file() for marker in MODEL_FOLDER_MARKERS):
            example = next(str(p.relative_to(out)) for p in sorted(out.rglob("*")) if not p.is_dir() or
                           not any(p.iterdir()))
            raise FileExistsError(f"output {out} is not a model folder (no config.json) but holds files "
                                  f"(e.g. {example}); --force only replaces model folders: choose another --out "
                                  f"or empty it yourself")
    return out


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def clean_stale_temporaries(out: Path) -> list[Path]:
    """Remove ``.OUT.llmq-tmp-*`` / ``.OUT.llmq-old-*`` folders beside ``out`` left by killed runs.

    A temporary folder whose writer is still running (pid in its name, process alive) is left
    alone. An ``-old-`` folder is the previous output of a run killed between its two renames:
    it goes back to ``out`` when ``out`` is missing, so nothing is lost. Returns what was removed.
    """
    removed = []
    if not out.parent.is_dir():
        return removed
    for path in sorted(out.parent.iterdir()):
        m = _TEMPORARY.match(path.name)
        if not m or m["name"] != out.name or not path.is_dir():
            continue
        if m["pid"] is not None and int(m["pid"]) != os.getpid() and _alive(int(m["pid"])):
            continue
        if m["kind"] == "old" and not out.exists():
            path.rename(out)
            log.warning(f"llmq: restored {out} from {path.name}, left by a run killed while replacing it")
            continue
        shutil.rmtree(path, ignore_errors=True)
        log.warning(f"llmq: removed {path}, a temporary folder left by an interrupted run")
        removed.append(path)
    return removed


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _make_modes_ordinary(folder: Path) -> None:
    """Give every file 0666 and folder 0777 minus the umask, as ``open()``/``mkdir`` would.

    Some writers (safetensors via a private temporary file) create 0600 files; a checkpoint's
    files should all share the permissions of its ``config.json``.
    """
    mask = _umask()
    for path in [folder, *folder.rglob("*")]:
        path.chmod((0o777 if path.is_dir() else 0o666) & ~mask)


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
    tag = f"{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp = out.parent / f".{out.name}.llmq-tmp-{tag}"
    old = out.parent / f".{out.name}.llmq-old-{tag}"
    try:
        tmp.mkdir()
        yield tmp
        _make_modes_ordinary(tmp)
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
