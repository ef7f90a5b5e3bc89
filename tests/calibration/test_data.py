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
