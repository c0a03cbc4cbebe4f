import numpy as np
import pytest

from results.metrics import METRICS, binary_metrics, bootstrap_ci, score, youden_threshold


def test_metrics_match_a_hand_counted_confusion_matrix():
    y = np.array([1, 1, 1, 1, 0, 0, 0, 0, 0, 0])
    prob = np.array([0.9, 0.8, 0.6, 0.3, 0.7, 0.4, 0.2, 0.1, 0.1, 0.05])
    # At 0.5: TP 3 (0.9, 0.8, 0.6), FN 1 (0.3), FP 1 (0.7), TN 5.
    result = score(y, prob, 0.5, resamples=50)
    assert result["confusion_matrix"] == [[5, 1], [1, 3]]
    m = {k: v["value"] for k, v in result["metrics"].items()}
    assert m["accuracy"] == pytest.approx(8 / 10)
    assert m["precision"] == pytest.approx(3 / 4)
    assert m["recall"] == pytest.approx(3 / 4)
    assert m["specificity"] == pytest.approx(5 / 6)
    assert m["f1"] == pytest.approx(0.75)
    # AUC: of 24 positive-negative pairs the positive scores higher in all but three:
    # 0.6 < 0.7, and 0.3 < 0.7 and 0.4.
    assert m["roc_auc"] == pytest.approx(21 / 24)


def test_bootstrap_intervals_hold_the_estimate_and_are_seeded():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 200)
    prob = np.clip(y * 0.3 + rng.random(200) * 0.7, 0, 1)
    point = binary_metrics(y, prob, 0.5)
    first = bootstrap_ci(y, prob, 0.5, resamples=300, seed=7)
    assert first == bootstrap_ci(y, prob, 0.5, resamples=300, seed=7)
    assert first != bootstrap_ci(y, prob, 0.5, resamples=300, seed=8)
    for name in METRICS:
        low, high = first[name]
        assert low <= point[name] <= high and high - low < 0.3


def test_youden_threshold_separates_a_separable_case():
    y = np.array([0, 0, 0, 1, 1, 1])
    prob = np.array([0.1, 0.2, 0.35, 0.4, 0.8, 0.9])
    threshold = youden_threshold(y, prob)
    assert 0.35 < threshold <= 0.4
    assert binary_metrics(y, prob, threshold)["accuracy"] == 1.0


def test_vectorised_bootstrap_counts_agree_with_scikit_learn():
    """bootstrap_ci counts the threshold metrics itself; with one resample, both ends of each
    interval are that resample's value, which must equal binary_metrics' on it."""
    rng = np.random.default_rng(3)
    y = rng.integers(0, 2, 40)
    prob = rng.random(40)
    expected = binary_metrics(y, prob, 0.4)
    draws = np.random.default_rng(11).integers(0, 40, size=(1, 40))
    resampled = binary_metrics(y[draws[0]], prob[draws[0]], 0.4)
    got = bootstrap_ci(y, prob, 0.4, resamples=1, seed=11)
    for name in METRICS:
        assert got[name][0] == pytest.approx(resampled[name]) == got[name][1]
    assert expected != resampled  # the resample really differs from the data
