import numpy as np
import pytest
from scipy.special import logit
from scipy.stats import binomtest
from scipy.stats import t as student_t
from sklearn.metrics import average_precision_score, roc_auc_score

from results.metrics import (
    CALIBRATION,
    METRICS,
    PAIRED,
    PROPORTIONS,
    Z95,
    _Resamples,
    auc_ci,
    binary_metrics,
    bootstrap_ci,
    calibration,
    paired_bootstrap,
    proportion_ci,
    score,
    sensitivity_threshold,
    wilson_interval,
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


def _youden(y: np.ndarray, prob: np.ndarray, threshold: float) -> float:
    m = binary_metrics(y, prob, threshold)
    return m["recall"] + m["specificity"] - 1


def _adjacent(prob: np.ndarray, threshold: float) -> tuple[float, float]:
    """The scores just above and just below a threshold (0 below the lowest)."""
    scores = np.unique(np.append(prob, 0.0))
    return scores[scores >= threshold].min(), scores[scores < threshold].max()


def test_youden_threshold_is_a_best_cut_placed_midway_between_adjacent_scores():
    rng = np.random.default_rng(12)
    for case in range(200):
        n = int(rng.integers(4, 40))
        y = rng.integers(0, 2, n)
        y[:2] = [0, 1]
        prob = rng.random(n) * 0.5 + 0.3 * y
        if case % 2:
            prob = np.round(prob, 1)  # tied scores
        threshold = youden_threshold(y, prob)
        cuts = np.unique(prob)[:, None]  # every rule "prob >= score", counted directly
        best = ((prob[y == 1] >= cuts).mean(1) + (prob[y == 0] < cuts).mean(1) - 1).max()
        # It calls val as a J-maximising cut "prob >= score" does, sitting strictly between the
        # lowest score it calls positive and the next lower one, at their midpoint.
        assert _youden(y, prob, threshold) == pytest.approx(best, abs=1e-12), case
        upper, lower = _adjacent(prob, threshold)
        assert lower < threshold < upper and threshold == (upper + lower) / 2, case


def test_youden_threshold_takes_the_middle_of_tied_cuts():
    # J = 1/3 at the cuts 0.9, 0.7 and 0.5 (0 between): the middle one, 0.7, then halfway
    # to 0.6. Scikit-learn's argmax took the highest, 0.9.
    y = np.array([1, 0, 1, 0, 1, 0])
    prob = np.array([0.9, 0.8, 0.7, 0.6, 0.5, 0.4])
    assert youden_threshold(y, prob) == pytest.approx(0.65)
    # Two tied cuts, 0.9 and 0.7: the lower of the two middle ones, the more sensitive.
    assert youden_threshold(y[:4], prob[:4]) == pytest.approx(0.65)
    # The best cut calls everything positive: halfway from the lowest score to 0.
    assert youden_threshold(np.array([0, 1]), np.array([0.9, 0.2])) == pytest.approx(0.1)
    with pytest.raises(ValueError, match="both classes"):
        youden_threshold(np.ones(3), np.array([0.2, 0.5, 0.9]))


def test_sensitivity_threshold_is_the_highest_reaching_the_target():
    y = np.array([1, 1, 1, 1, 0, 0])
    prob = np.array([0.9, 0.8, 0.6, 0.3, 0.7, 0.2])
    assert sensitivity_threshold(y, prob, 0.75) == pytest.approx((0.6 + 0.3) / 2)  # 3 of 4
    assert sensitivity_threshold(y, prob, 1.0) == pytest.approx((0.3 + 0.2) / 2)
    assert sensitivity_threshold(np.array([0, 1]), np.array([0.9, 0.2]), 1.0) == 0.1
    rng = np.random.default_rng(5)
    for case in range(200):
        n = int(rng.integers(4, 60))
        y = rng.integers(0, 2, n)
        y[0] = 1
        prob = np.round(rng.random(n) * 0.6 + 0.3 * y, 1 + case % 3)
        target = float(rng.choice([0.5, 0.8, 0.9, 0.95, 1.0]))
        threshold = sensitivity_threshold(y, prob, target)
        assert binary_metrics(y, prob, threshold)["recall"] >= target, case
        upper, lower = _adjacent(prob, threshold)
        assert lower < threshold < upper and threshold == (upper + lower) / 2, case
        above = prob[prob > upper]  # the next higher cut no longer reaches the target
        assert not len(above) or np.mean(prob[y == 1] >= above.min()) < target, case
    for target in (0.0, 1.1):
        with pytest.raises(ValueError, match="not in"):
            sensitivity_threshold(y, prob, target)


def test_wilson_intervals_match_a_published_table_and_scipy():
    # Newcombe (1998), Statistics in Medicine 17:857, Table II, method 3 (Wilson score).
    for (successes, trials), expected in {(81, 263): (0.2553, 0.3662),
                                          (15, 148): (0.0624, 0.1605),
                                          (0, 20): (0.0, 0.1611),
                                          (1, 29): (0.0061, 0.1718)}.items():
        got = wilson_interval(successes, trials)
        assert got == pytest.approx(expected, abs=5e-5)
        reference = binomtest(successes, trials).proportion_ci(method="wilson")
        assert got == pytest.approx([reference.low, reference.high], abs=1e-12)


def test_intervals_never_collapse_at_zero_or_all_successes():
    for trials in range(1, 11):
        low, high = wilson_interval(0, trials)
        assert low == 0 and high > 0.2
        low, high = wilson_interval(trials, trials)
        assert high == 1 and low < 0.8
    assert wilson_interval(0, 0) == [0.0, 1.0]  # no trials: nothing known
    # A separable split of six: no proportion or AUC interval is a point, and each holds its
    # estimate, at 0.5 (3 of 3 right) as at a threshold that misses everything.
    y = np.array([0, 0, 0, 1, 1, 1])
    prob = np.array([0.1, 0.2, 0.3, 0.7, 0.8, 0.9])
    for threshold in (0.5, 0.95):
        result = score(y, prob, threshold, resamples=100)
        for name in (*PROPORTIONS, "roc_auc"):
            value, (low, high) = result["metrics"][name]["value"], result["metrics"][name]["ci95"]
            assert low <= value <= high and high - low > 0.2, (threshold, name)
    # With 3 + 3 patients of 5 alike slices each, the slices count as the 6 patients.
    groups = np.repeat(np.arange(6), 5)
    grouped = score(np.repeat(y, 5), np.repeat(prob, 5), 0.5, resamples=100, groups=groups)
    assert grouped["metrics"]["accuracy"]["ci95"] == pytest.approx(wilson_interval(6, 6))


def test_score_says_which_method_made_each_interval():
    rng = np.random.default_rng(2)
    y, prob = rng.integers(0, 2, 50), rng.random(50)
    result = score(y, prob, 0.5, resamples=100)
    assert set(result) == {"metrics", "confusion_matrix", "calibration", "resamples_dropped",
                           "intervals"}
    assert result["intervals"] == {"accuracy": "wilson", "precision": "wilson",
                                   "recall": "wilson", "specificity": "wilson",
                                   "roc_auc": "delong", "f1": "bootstrap",
                                   "pr_auc": "bootstrap", "brier": "bootstrap",
                                   "ece": "bootstrap"}
    counted = proportion_ci(y, prob, 0.5)
    for name in PROPORTIONS:
        assert result["metrics"][name]["ci95"] == counted[name]
    assert result["metrics"]["roc_auc"]["ci95"] == auc_ci(y, prob)[0]
    boot = bootstrap_ci(y, prob, 0.5, resamples=100)
    assert result["metrics"]["f1"]["ci95"] == boot["f1"]
    assert result["calibration"]["ece"]["ci95"] == boot["ece"]
    grouped = score(y, prob, 0.5, resamples=100, groups=np.arange(50) // 5)["intervals"]
    assert grouped["recall"] == "wilson_design_effect" and grouped["roc_auc"] == "obuchowski"
    separable = score(np.array([0, 0, 1, 1]), np.array([.1, .2, .8, .9]), 0.5, resamples=100)
    assert separable["intervals"]["roc_auc"] == "hanley_mcneil"


def test_delong_variance_of_a_hand_computed_case():
    # The case of the first test: AUC 21/24. Placements of the positives among the six
    # negatives 1, 1, 5/6, 4/6; of the negatives among the four positives 1/2, 3/4, 1, 1, 1, 1.
    # S10 = (2/64 + 1/576 + 25/576) / 3 = 11/432, S01 = (9/64 + 1/64 + 4/64) / 5 = 7/160;
    # var = S10 / 4 + S01 / 6 = 59/4320 (DeLong et al. 1988).
    y = np.array([1, 1, 1, 1, 0, 0, 0, 0, 0, 0])
    prob = np.array([0.9, 0.8, 0.6, 0.3, 0.7, 0.4, 0.2, 0.1, 0.1, 0.05])
    (low, high), method = auc_ci(y, prob)
    assert method == "delong"
    auc = 21 / 24
    # The interval is logit(AUC) +- z se / (AUC (1 - AUC)).
    se = (logit(high) - logit(low)) / (2 * Z95) * auc * (1 - auc)
    assert se ** 2 == pytest.approx(59 / 4320, rel=1e-12)
    assert (logit(low) + logit(high)) / 2 == pytest.approx(logit(auc))
    # Separable 3 + 3: Hanley & McNeil's variance at AUC 1 in Newcombe's form is worth
    # 3 * 3 / (1 + (3 - 1) / 2) = 4.5 pairs; Wilson's lower bound at 4.5 of 4.5 is
    # 4.5 / (4.5 + z^2).
    (low, high), method = auc_ci(np.array([0, 0, 0, 1, 1, 1]), np.arange(6) / 10)
    assert method == "hanley_mcneil" and high == 1
    assert low == pytest.approx(4.5 / (4.5 + Z95 ** 2))


def test_clustered_auc_interval_counts_groups_not_slices():
    """Obuchowski's variance sums the placements within each group: copies of each row in its
    own group change nothing, and on groups of unlike slices of both classes the variance is
    what the group bootstrap finds."""
    rng = np.random.default_rng(9)
    y = np.arange(30) % 2
    prob = rng.random(30) + 0.3 * y
    one_each = auc_ci(y, prob, np.arange(30))
    copied = auc_ci(np.repeat(y, 4), np.repeat(prob, 4), np.repeat(np.arange(30), 4))
    assert copied[1] == "obuchowski" and copied[0] == pytest.approx(one_each[0])
    assert one_each[0] != auc_ci(y, prob)[0]  # a t quantile with groups, not z

    groups = rng.integers(0, 300, 1500)  # 300 patients, both classes among their slices
    effect = rng.normal(0, 1, 300)[groups]
    y = rng.integers(0, 2, 1500)
    prob = 1 / (1 + np.exp(-(y + effect + rng.normal(0, 0.7, 1500))))
    (low, high), _ = auc_ci(y, prob, groups)
    resampled = _Resamples(len(y), 2000, 0, groups).ranking_scores(y, prob)["roc_auc"]
    auc = roc_auc_score(y, prob)
    # Near z at 300 groups; the bootstrap's spread of the logit AUC is the interval's se.
    se = (logit(high) - logit(low)) / (2 * Z95)
    assert se == pytest.approx(np.std(logit(resampled)), rel=0.1)
    assert (logit(low) + logit(high)) / 2 == pytest.approx(logit(auc))


def test_proportions_with_groups_take_the_effective_number_of_slices():
    # 20 patients of 5 slices, 10 with 5 right and 10 with 3: rate 0.8, residuals +-1, design
    # effect 20/19 * 20 / (100 * 0.8 * 0.2) = 25/19, so 76 slices' worth, times (z / t_19)^2
    # for Satterthwaite's df (19 for equal residuals).
    right = np.concatenate([np.ones(50), np.tile([1, 1, 1, 0, 0], 10)])
    groups = np.repeat(np.arange(20), 5)
    y = np.ones(100, int)
    prob = np.where(right == 1, 0.9, 0.1)
    effective = 76 * (Z95 / student_t.ppf(0.975, 19)) ** 2
    got = proportion_ci(y, prob, 0.5, groups)
    assert got["recall"] == pytest.approx(wilson_interval(0.8 * effective, effective))
    assert got["accuracy"] == got["recall"]
    # Each patient's slices copied changes nothing; without groups the 100 slices count fully.
    copied = proportion_ci(np.repeat(y, 3), np.repeat(prob, 3), 0.5, np.repeat(groups, 3))
    assert copied["recall"] == pytest.approx(got["recall"])
    assert proportion_ci(y, prob, 0.5)["recall"] == wilson_interval(80, 100)
    # All right: nothing measures the design effect; patients of 2 and 8 slices are worth
    # Kish's (2 + 8)^2 / (4 + 64) of them, whatever their slices.
    assert proportion_ci(np.ones(10, int), np.ones(10), 0.5, np.repeat([0, 1], [2, 8]))[
        "recall"] == pytest.approx(wilson_interval(100 / 68, 100 / 68))
