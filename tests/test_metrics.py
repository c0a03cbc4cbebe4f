import numpy as np
import pytest
from sklearn.metrics import average_precision_score, roc_auc_score

from results.metrics import (
    CALIBRATION,
    METRICS,
    PAIRED,
    binary_metrics,
    bootstrap_ci,
    calibration,
    paired_bootstrap,
    score,
    youden_threshold,
)


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


@pytest.mark.parametrize("grouped", [False, True])
def test_bootstrap_aucs_equal_scikit_learns_on_each_resample(grouped):
    """bootstrap_ci scores the AUCs of all resamples at once. Drawn one resample at a time
    (tied scores, repeated rows and whole groups included), both ends of each AUC's interval are
    that resample's, as scikit-learn computes it on the resample's rows."""
    rng = np.random.default_rng(4)
    y, prob = rng.integers(0, 2, 40), np.round(rng.random(40), 1)  # scores tie often
    groups = rng.integers(0, 12, 40) if grouped else None
    group_of = np.unique(groups, return_inverse=True)[1] if grouped else np.arange(40)
    checked = 0
    for seed in range(80):
        draw = np.random.default_rng(seed).integers(0, group_of.max() + 1, (1, group_of.max() + 1))
        rows = np.concatenate([np.flatnonzero(group_of == g) for g in draw[0]])
        got = bootstrap_ci(y, prob, 0.5, resamples=1, seed=seed, groups=groups)
        if 0 < y[rows].sum() < len(rows):
            checked += 1
            for name, sklearn_score in (("roc_auc", roc_auc_score),
                                        ("pr_auc", average_precision_score)):
                expected = sklearn_score(y[rows], prob[rows])
                assert got[name] == pytest.approx([expected, expected], abs=1e-12), (seed, name)
        else:
            assert got["resamples_dropped"] == 1 and np.isnan(got["roc_auc"]).all()
    assert checked >= 60


def test_auc_estimates_are_scikit_learns_and_inside_their_intervals():
    """The data's own AUCs come from the computation that scores the resamples, so an interval
    that reaches the estimate (a separable test split: every resample scores 1) holds it."""
    rng = np.random.default_rng(8)
    for case in range(30):
        y = rng.integers(0, 2, 25)
        prob = np.round(rng.random(25), 2) if case % 3 else y * 0.5 + rng.random(25) * 0.4
        scored = score(y, prob, 0.5, resamples=200, seed=case)["metrics"]
        for name, sklearn_score in (("roc_auc", roc_auc_score),
                                    ("pr_auc", average_precision_score)):
            value, (low, high) = scored[name]["value"], scored[name]["ci95"]
            assert value == pytest.approx(sklearn_score(y, prob), abs=1e-12)
            assert low <= value <= high, (case, name)


def test_calibration_of_a_hand_checked_case():
    y = np.array([0, 0, 1, 1, 1])
    prob = np.array([0.05, 0.15, 0.15, 0.85, 0.95])
    # Brier: (0.05² + 0.15² + 0.85² + 0.15² + 0.05²) / 5 = 0.7725 / 5.
    # Bins: [0, 0.1): 0.05 vs 0 -> |0 - 0.05|; [0.1, 0.2): 0.15 + 0.15 vs 1 -> 0.7;
    # [0.8, 0.9): 0.85 vs 1 -> 0.15; [0.9, 1]: 0.95 vs 1 -> 0.05. ECE = 0.95 / 5.
    got = calibration(y, prob)
    assert got["brier"] == pytest.approx(0.7725 / 5)
    assert got["ece"] == pytest.approx(0.95 / 5)
    assert [(b["low"], b["n"], b["fraction_positive"]) for b in got["bins"]] == [
        (0.0, 1, 0.0), (0.1, 2, 0.5), (0.8, 1, 1.0), (0.9, 1, 1.0)]
    assert got["bins"][1]["mean_prob"] == pytest.approx(0.15)
    low, high = score(y, prob, 0.5, resamples=200)["calibration"]["brier"]["ci95"]
    assert low <= got["brier"] <= high


def test_resampling_groups_widens_intervals_when_a_groups_slices_are_alike():
    """Ten patients with ten identical slices each: 100 slices hold only 10 independent
    observations, and the group bootstrap must say so with wider intervals."""
    rng = np.random.default_rng(0)
    patient_y = np.array([0, 1] * 5)
    patient_prob = np.clip(patient_y * 0.4 + rng.random(10) * 0.6, 0, 1)
    y, prob = np.repeat(patient_y, 10), np.repeat(patient_prob, 10)
    groups = np.repeat(np.arange(10), 10)
    by_slice = bootstrap_ci(y, prob, 0.5, resamples=400, seed=1)
    by_patient = bootstrap_ci(y, prob, 0.5, resamples=400, seed=1, groups=groups)
    for name in ("accuracy", "roc_auc", "brier", "ece"):
        assert np.diff(by_patient[name]) > 1.5 * np.diff(by_slice[name]), name


def test_group_bootstrap_counts_agree_with_scikit_learn():
    rng = np.random.default_rng(5)
    y, prob, groups = rng.integers(0, 2, 30), rng.random(30), rng.integers(0, 8, 30)
    draw = np.random.default_rng(2).integers(0, 8, size=(1, 8))[0]
    rows = np.concatenate([np.flatnonzero(groups == g) for g in draw])
    expected = {**binary_metrics(y[rows], prob[rows], 0.5), **calibration(y[rows], prob[rows])}
    got = bootstrap_ci(y, prob, 0.5, resamples=1, seed=2, groups=groups)
    for name in METRICS + CALIBRATION:
        assert got[name][0] == pytest.approx(expected[name]) == got[name][1], name


def test_resamples_that_draw_one_class_are_counted():
    y = np.array([0] * 9 + [1])
    prob = np.linspace(0, 1, 10)
    got = score(y, prob, 0.5, resamples=200, seed=0)
    # The same draws: a resample misses the one positive with probability 0.9^10, about 0.35.
    draws = np.random.default_rng(0).integers(0, 10, size=(200, 10))
    expected = sum(1 for d in draws if y[d].sum() in (0, len(d)))
    assert got["resamples_dropped"] == expected and 40 < expected < 100


def test_paired_bootstrap_scores_both_models_on_the_same_resamples():
    """A toy case checked resample by resample: the interval of the difference is that of the
    per-resample differences, both models scored on each resample that bootstrap_ci draws."""
    y = np.array([0, 0, 0, 0, 1, 1, 1, 1, 0, 1])
    a = np.array([0.1, 0.2, 0.3, 0.6, 0.7, 0.8, 0.9, 0.4, 0.2, 0.9])
    b = np.array([0.4, 0.5, 0.6, 0.5, 0.5, 0.6, 0.7, 0.3, 0.6, 0.5])
    paired = paired_bootstrap(y, a, 0.5, b, 0.55, resamples=200, seed=3)
    draws = np.random.default_rng(3).integers(0, len(y), size=(200, len(y)))
    accuracy, brier, auc = [], [], []
    for i in draws:
        accuracy.append(np.mean((a[i] >= 0.5) == y[i]) - np.mean((b[i] >= 0.55) == y[i]))
        brier.append(np.mean((a[i] - y[i]) ** 2) - np.mean((b[i] - y[i]) ** 2))
        if 0 < y[i].sum() < len(i):
            auc.append(roc_auc_score(y[i], a[i]) - roc_auc_score(y[i], b[i]))
    for name, values in (("accuracy", accuracy), ("brier", brier), ("roc_auc", auc)):
        assert paired[name]["ci95"] == pytest.approx(np.percentile(values, [2.5, 97.5])), name
    assert paired["accuracy"]["value"] == pytest.approx(0.8 - 0.5)  # 2 and 5 wrong
    assert paired["roc_auc"]["value"] == pytest.approx(roc_auc_score(y, a) - roc_auc_score(y, b))
    assert paired["resamples_dropped"] == 200 - len(auc)
    # A model against itself differs by exactly 0 on every resample, groups or not.
    same = paired_bootstrap(y, a, 0.5, a, 0.5, 100, 0, groups=np.arange(10) // 2)
    assert all(same[m]["value"] == 0 and same[m]["ci95"] == [0, 0] for m in PAIRED)
