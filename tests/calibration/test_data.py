import json

import pytest
import torch
from conftest import TINY_TEXT, make_tiny_tokenizer

from llmq.calibration import CalibrationSpec, calibration_batch, check_calibration_source, load_calibration_texts


@pytest.fixture(scope="module")
def tokenizer():
    return make_tiny_tokenizer()


@pytest.fixture
def text_file(tmp_path):
    path = tmp_path / "calib.txt"
    path.write_text(TINY_TEXT * 3)
    return path


def test_txt_windows_are_deterministic(tokenizer, text_file):
    spec = CalibrationSpec(source=str(text_file), nsamples=5, seqlen=16, seed=0)
    a = calibration_batch(tokenizer, spec)
    assert a.shape == (5, 16) and a.dtype == torch.int64
    assert torch.equal(a, calibration_batch(tokenizer, spec))
    assert not torch.equal(a, calibration_batch(tokenizer, CalibrationSpec(str(text_file), 5, 16, seed=1)))
    full = tokenizer(TINY_TEXT * 3, add_special_tokens=False).input_ids
    row = a[0].tolist()
    assert any(full[i : i + 16] == row for i in range(len(full) - 15))  # windows are real text


def test_jsonl_objects_and_strings(tmp_path):
    path = tmp_path / "calib.jsonl"
    path.write_text(json.dumps({"text": "first"}) + "\n\n" + json.dumps("second") + "\n")
    assert load_calibration_texts(str(path)) == ["first", "second"]
    path.write_text('{"body": "no text field"}\n')
    with pytest.raises(ValueError, match=r"calib.jsonl:1: expected a string"):
        load_calibration_texts(str(path))


def test_missing_file_fails_clearly():
    with pytest.raises(FileNotFoundError, match="does not exist"):
        check_calibration_source("no/such/calib.txt")


def test_unsupported_file_type(tmp_path):
    path = tmp_path / "calib.csv"
    path.write_text("a,b")
    with pytest.raises(ValueError, match="unsupported type"):
        check_calibration_source(str(path))


def test_empty_text_fails_clearly(tokenizer, tmp_path):
    path = tmp_path / "empty.txt"
    path.write_text("  \n\n ")
    with pytest.raises(ValueError, match="contains no text"):
        calibration_batch(tokenizer, CalibrationSpec(str(path), 4, 16))


def test_too_short_text_fails_clearly(tokenizer, tmp_path):
    path = tmp_path / "short.txt"
    path.write_text("A short text.")
    with pytest.raises(ValueError, match="fewer than one window of --seqlen 512"):
        calibration_batch(tokenizer, CalibrationSpec(str(path), 4, 512))


@pytest.mark.parametrize("kw,match", [({"nsamples": 0}, "--nsamples"), ({"seqlen": 1}, "--seqlen")],
                         ids=["nsamples-0", "seqlen-1"])
def test_bad_sizes(kw, match):
    with pytest.raises(ValueError, match=match):
        CalibrationSpec(**kw)


def test_datasets_source_needs_a_name():
    with pytest.raises(ValueError, match="dataset name"):
        check_calibration_source("hf:")


class _FakeDataset:
    def __init__(self, columns: dict):
        self.columns = columns
        self.column_names = list(columns)

    def __getitem__(self, name):
        return self.columns[name]


def test_datasets_source_parses_name_config_split(monkeypatch, tokenizer):
    """``hf:NAME[:CONFIG[:SPLIT]]`` reaches ``datasets.load_dataset`` as such (split ``train`` by default);
    empty rows are dropped. A stand-in ``datasets`` module, so this runs offline and without the package."""
    import types

    calls = []

    def load_dataset(name, config, split):
        calls.append((name, config, split))
        return _FakeDataset({"text": [TINY_TEXT, "", TINY_TEXT * 2]})

    monkeypatch.setitem(__import__("sys").modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    assert load_calibration_texts("hf:wikitext:wikitext-2-raw-v1:validation") == [TINY_TEXT, TINY_TEXT * 2]
    assert load_calibration_texts("hf:some/corpus") == [TINY_TEXT, TINY_TEXT * 2]
    assert calls == [("wikitext", "wikitext-2-raw-v1", "validation"), ("some/corpus", None, "train")]
    batch = calibration_batch(tokenizer, CalibrationSpec("hf:some/corpus", nsamples=3, seqlen=16))
    assert batch.shape == (3, 16)

    def no_text(name, config, split):
        return _FakeDataset({"content": ["x"]})

    monkeypatch.setattr(__import__("sys").modules["datasets"], "load_dataset", no_text)
    with pytest.raises(ValueError, match=r"dataset 'other' has no 'text' column \(columns: \['content'\]\)"):
        load_calibration_texts("hf:other")


def test_datasets_source_without_the_package_says_how_to_get_it(monkeypatch):
    monkeypatch.setitem(__import__("sys").modules, "datasets", None)  # import datasets -> ImportError
    with pytest.raises(ImportError, match="needs the `datasets` package: pip install datasets"):
        check_calibration_source("hf:wikitext")


def test_datasets_source_with_the_real_package(monkeypatch, tmp_path, tokenizer):
    """The real ``datasets`` (not a declared dependency; skipped where absent) on a local text folder,
    offline: its ``text`` builder gives one row per line."""
    datasets = pytest.importorskip("datasets")
    monkeypatch.setattr(datasets.config, "HF_DATASETS_OFFLINE", True, raising=False)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "cache")
    folder = tmp_path / "corpus"
    folder.mkdir()
    content = "first line of text\n\nsecond line\n" + TINY_TEXT
    (folder / "part.txt").write_text(content)
    texts = load_calibration_texts(f"hf:{folder}")
    assert texts == [line for line in content.splitlines() if line]
    assert calibration_batch(tokenizer, CalibrationSpec(f"hf:{folder}", nsamples=2, seqlen=16)).shape == (2, 16)


def test_bbc_default_is_disjoint_from_eval_text():
    from llmq.data.bbc import eval_text

    texts = load_calibration_texts("bbc")
    assert len(texts) > 100
    held_out = eval_text()
    assert not any(t[:200] in held_out for t in texts[:50])


def test_selection_text_is_the_calibration_split_not_the_eval_text():
    """The scripts' `--text selection` (where defaults are chosen) never shows the evaluation text."""
    from llmq.data.bbc import calibration_text, calibration_texts, eval_text, named_text

    selection = named_text("selection")
    assert named_text("eval") == eval_text() and selection == calibration_text()
    assert selection.startswith(calibration_texts()[0]) and selection[:2000] not in eval_text()
    with pytest.raises(ValueError, match="unknown text 'test'"):
        named_text("test")
