"""Calibration data: token windows for the methods that look at activations (GPTQ, AWQ, W8A8).

Sources (``--calib``):

* ``"bbc"`` (default): the embedded BBC corpus' calibration split
  (``llmq.data.bbc.calibration_texts``: business + sports, odd file numbers),
  disjoint from the evaluation text (tech + politics, even numbers);
* a local ``.txt`` file (the whole file is one text) or ``.jsonl`` file (one JSON
  object per line with a ``"text"`` field, or one JSON string per line);
* ``hf:NAME[:CONFIG[:SPLIT]]``: a Hugging Face ``datasets`` dataset (column
  ``text``; split ``train`` by default), when ``datasets`` is installed and online.

Sampling (the one sampler: weight-only methods and W8A8 alike): the texts are joined
by blank lines, tokenized once without special tokens, and ``nsamples`` windows of
``seqlen`` tokens start at offsets drawn uniformly from ``0 … N − seqlen`` (N tokens)
by a ``torch.Generator`` seeded with ``seed`` — the same arguments give the same
tensor on every machine. ``N − seqlen`` is the last offset whose window still fits, so
it is included (``randint``'s high bound is exclusive: ``N − seqlen + 1``). The GPTQ
reference and the former ``llmq.w8a8.calibration_batches`` stopped one short
(``0 … N − seqlen − 1``), a leftover of sampling a next-token target that calibration
does not need; a text of exactly ``seqlen`` tokens gives one window here, none there.

Every problem (missing file, empty text, fewer tokens than one window, bad
``nsamples``/``seqlen``) raises before any model is loaded or quantized:
``check_calibration_source`` validates the source cheaply, and
``calibration_batch`` raises before returning.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

DEFAULT_SOURCE = "bbc"
_FILE_SUFFIXES = (".txt", ".jsonl")


@dataclass(frozen=True)
class CalibrationSpec:
    """Which calibration windows to draw; recorded in ``quantization_config``."""

    source: str = DEFAULT_SOURCE
    nsamples: int = 128
    seqlen: int = 512
    seed: int = 0

    def __post_init__(self) -> None:
        if not isinstance(self.nsamples, int) or self.nsamples < 1:
            raise ValueError(f"--nsamples must be a positive integer, got {self.nsamples!r}")
        if not isinstance(self.seqlen, int) or self.seqlen < 2:
            raise ValueError(f"--seqlen must be an integer >= 2, got {self.seqlen!r}")

    def to_dict(self) -> dict:
        return asdict(self)


def _is_file_source(source: str) -> bool:
    return source.endswith(_FILE_SUFFIXES) or "/" in source or "\\" in source or Path(source).exists()


def check_calibration_source(source: str) -> None:
    """Raise now (before any work) if ``source`` cannot provide calibration text."""
    if source == DEFAULT_SOURCE:
        from llmq.data.bbc import corpus_dir

        corpus_dir()  # raises FileNotFoundError naming the missing package
        return
    if source.startswith("hf:"):
        if len(source) <= 3:
            raise ValueError("--calib hf: needs a dataset name, e.g. hf:wikitext:wikitext-2-raw-v1")
        try:
            import datasets  # noqa: F401
        except ImportError:
            raise ImportError(
                f"--calib {source} needs the `datasets` package: pip install datasets (and network access)"
            ) from None
        return
    path = Path(source)
    if not path.is_file():
        raise FileNotFoundError(
            f"calibration file {source!r} does not exist; pass an existing .txt/.jsonl file, "
            f"'bbc' (the embedded corpus) or hf:NAME for a datasets dataset"
        )
    if path.suffix not in _FILE_SUFFIXES:
        raise ValueError(f"calibration file {source!r}: unsupported type {path.suffix!r}; use .txt or .jsonl")


def load_calibration_texts(source: str = DEFAULT_SOURCE) -> list[str]:
    """The raw texts of ``source`` (see module docstring)."""
    check_calibration_source(source)
    if source == DEFAULT_SOURCE:
        from llmq.data.bbc import calibration_texts

        return calibration_texts()
    if source.startswith("hf:"):
        import datasets

        name, config, split = (source[3:].split(":") + [None, None])[:3]
        ds = datasets.load_dataset(name, config, split=split or "train")
        if "text" not in ds.column_names:
            raise ValueError(f"dataset {name!r} has no 'text' column (columns: {ds.column_names})")
        return [t for t in ds["text"] if t]
    path = Path(source)
    if path.suffix == ".txt":
        return [path.read_text(encoding="utf-8", errors="replace")]
    texts = []
    for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{source}:{lineno}: not valid JSON ({e})") from None
        text = item.get("text") if isinstance(item, dict) else item
        if not isinstance(text, str):
            raise ValueError(f"{source}:{lineno}: expected a string or an object with a 'text' string field")
        texts.append(text)
    return texts


def calibration_batch(tokenizer, spec: CalibrationSpec) -> torch.Tensor:
    """``[nsamples, seqlen]`` int64 token windows drawn deterministically from ``spec.source``."""
    texts = load_calibration_texts(spec.source)
    text = "\n\n".join(t.strip() for t in texts if t and t.strip())
    if not text:
        raise ValueError(f"calibration source {spec.source!r} contains no text")
    ids = tokenizer(text, add_special_tokens=False, return_tensors="pt").input_ids[0]
    if ids.numel() < spec.seqlen:
        raise ValueError(
            f"calibration source {spec.source!r} has only {ids.numel()} tokens, fewer than one window of "
            f"--seqlen {spec.seqlen}; give more text or a smaller --seqlen"
        )
    gen = torch.Generator().manual_seed(spec.seed)
    starts = torch.randint(0, ids.numel() - spec.seqlen + 1, (spec.nsamples,), generator=gen)
    return torch.stack([ids[s : s + spec.seqlen] for s in starts.tolist()])
