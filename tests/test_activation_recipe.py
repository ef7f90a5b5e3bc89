import json

import pytest

from llmq.recipes import DEFAULT_SMOOTHQUANT_ALPHA, ActGranularity, ActivationRecipe, ActScheme, ObserverKind


@pytest.mark.parametrize("kw", [
    dict(),
    dict(scheme="static", observer="kl", smoothquant_alpha=None),
    dict(scheme="static", observer="percentile", percentile=99.9, smoothquant_alpha=0.8),
    dict(scheme="static", observer="ema", momentum=0.5),
], ids=["dynamic", "static-kl", "static-pct", "static-ema"])
def test_json_round_trip(kw):
    r = ActivationRecipe(**kw)
    assert ActivationRecipe.from_dict(json.loads(json.dumps(r.to_dict()))) == r


def test_defaults_and_enums():
    r = ActivationRecipe(scheme="static", observer="mse")
    assert r.scheme is ActScheme.STATIC and r.granularity is ActGranularity.PER_TENSOR
    assert r.observer is ObserverKind.MSE
    assert ActivationRecipe().granularity is ActGranularity.PER_TOKEN


def test_smoothquant_alpha_defaults_per_scheme():
    """Static per-tensor scales get more outlier migration by default (chosen on held-out text); an
    explicit alpha, or None (no smoothing), is kept as given."""
    assert ActivationRecipe().smoothquant_alpha == DEFAULT_SMOOTHQUANT_ALPHA[ActScheme.DYNAMIC] == 0.5
    assert ActivationRecipe(scheme="static").smoothquant_alpha == DEFAULT_SMOOTHQUANT_ALPHA[ActScheme.STATIC] == 0.9
    assert ActivationRecipe(scheme="static", smoothquant_alpha=0.5).smoothquant_alpha == 0.5
    assert ActivationRecipe(scheme="static", smoothquant_alpha=None).smoothquant_alpha is None
    assert ActivationRecipe(scheme="static").to_dict()["smoothquant_alpha"] == 0.9  # resolved in the checkpoint


@pytest.mark.parametrize("kw, match", [
    (dict(bits=4), r"unsupported activation bits 4"),
    (dict(scheme="online"), r"unknown activation scheme 'online'"),
    (dict(scheme="static", granularity="per-token"), r"static activation scales are per-tensor"),
    (dict(observer="kl"), r"observer 'kl' calibrates static scales"),
    (dict(scheme="static", observer="entropy"), r"unknown observer 'entropy'"),
    (dict(momentum=1.0), r"momentum must be a number in \(0, 1\)"),
    (dict(percentile=20), r"percentile must be in \(50, 100\]"),
    (dict(smoothquant_alpha=1.5), r"alpha must be in \[0, 1\]"),
])
def test_validation_messages(kw, match):
    with pytest.raises(ValueError, match=match):
        ActivationRecipe(**kw)


def test_unknown_fields_rejected():
    with pytest.raises(ValueError, match="unknown activation-recipe fields"):
        ActivationRecipe.from_dict({"bits": 8, "colour": "red"})
