"""What evaluation chooses on val: the ensemble weights (and whether to take them), and the
temperature."""

import numpy as np
import pytest
import torch
from scipy.optimize import minimize_scalar
from scipy.special import expit
from sklearn.metrics import log_loss, roc_auc_score

from ctmodels import Ensemble
from results.evaluate import (
    LOG_T_BOUND,
    _compared_weights,
    caruana_weights,
    choose_ensemble,
    combine,
    fit_temperature,
    temperature_interval,
    val_halves,
)
from results.wording import COMPARED_BEST, COMPARED_RUNNER_UP
from tuning.records import SearchOptions


def test_caruana_selection_on_a_hand_made_case():
    """y = (1, 0). a is sure of the positive and unsure of the negative, b the other way round,
    c is wrong on both. Round 1 ties a and b (log-loss (ln 1/0.99 + ln 2) / 2 each) and takes
    a, the better-ranked; round 2 adds b, whose half share gives (0.745, 0.255), log-loss
    -ln 0.745; no later bag beats it, so the kept weights are 1/2, 1/2, 0."""
    y = np.array([1, 0])
    a, b, c = np.array([0.99, 0.5]), np.array([0.5, 0.01]), np.array([0.3, 0.7])
    weights, loss = caruana_weights(y, [a, b, c])
    assert weights.tolist() == [0.5, 0.5, 0.0]
    assert loss == pytest.approx(-np.log(0.745))
    assert caruana_weights(y, [c, a])[0].tolist() == [0.0, 1.0]  # never a worse member


def _members(n: int, noise: list[float], seed: int) -> tuple[np.ndarray, list[np.ndarray]]:
    """Labels drawn from a true logit, and members that see it through their own noise (None:
    a member that sees only noise)."""
    rng = np.random.default_rng(seed)
    truth = rng.normal(0, 2, n)
    y = (rng.random(n) < expit(truth)).astype(int)
    return y, [expit(truth + rng.normal(0, sd, n)) if sd is not None
               else expit(rng.normal(0, 1, n)) for sd in noise]


def test_selection_weighs_independent_members_and_cross_fitting_shows_a_flattering_gain():
    y, members = _members(400, [1.5, 1.5, 1.5], seed=0)
    choice = choose_ensemble(y, members)
    assert choice["chosen"] == "ensemble" and min(choice["weights"]) > 0
    losses = choice["val_log_loss"]
    assert choice["cross_fitted_log_loss"] < losses["single"]  # a gain that holds out of sample

    # On a small val split, selection gives weight to members that only fit its noise: its
    # log-loss on val is flattering, and on the halves it did not select on it is not.
    y, members = _members(40, [1.0, None, None, None, None], seed=3)
    choice = choose_ensemble(y, members)
    assert choice["chosen"] == "ensemble" and choice["weights"][0] < 1
    assert choice["val_log_loss"]["ensemble"] < choice["val_log_loss"]["single"]
    assert choice["cross_fitted_log_loss"] > choice["val_log_loss"]["single"]
    # One member: nothing to select.
    alone = choose_ensemble(y, members[:1])
    assert alone["weights"] == [1.0] and alone["chosen"] == "single"
    assert alone["cross_fitted_log_loss"] is None
    assert alone["why"] == "ensemble selection kept the best trial alone"


def test_val_halves_keep_groups_whole_and_both_classes_in_each():
    groups = np.repeat(np.arange(20), 3)
    y = (groups % 2).astype(int)
    first, second = val_halves(y, groups)
    assert len(first) + len(second) == 60
    assert not set(groups[first]) & set(groups[second])
    assert set(y[first]) == set(y[second]) == {0, 1}
    assert val_halves(np.array([0, 1, 1]), np.array([0, 1, 2])) is None  # one negative only
    # Too small to halve: no cross-fitted figure. Here the second-ranked trial ranks the three
    # slices right and the first does not: selection gives it the larger share.
    choice = choose_ensemble(np.array([0, 1, 1]), [np.array([0.6, 0.4, 0.9]),
                                                    np.array([0.1, 0.9, 0.5])])
    assert choice["weights"][1] > choice["weights"][0] and choice["cross_fitted_log_loss"] is None


def test_temperature_softens_overconfident_probabilities_and_lowers_the_log_loss():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 400)
    honest = np.clip(0.5 + (y - 0.5) * 0.4 + rng.normal(0, 0.25, 400), 0.01, 0.99)
    overconfident = combine([honest], [1], 1 / 3)  # logits tripled
    temperature, why = fit_temperature(y, overconfident)
    assert temperature > 1.5 and why is None
    assert log_loss(y, combine([overconfident], [1], temperature)) < log_loss(
        y, overconfident)
    assert fit_temperature(y, honest)[0] == pytest.approx(1.0, abs=0.35)


def test_the_regularised_temperature_is_finite_where_plain_fitting_runs_away():
    y = np.array([0, 0, 1, 1])
    # Separated: plain log-loss falls without end as T goes to 0. Platt's targets (3/4, 1/4
    # here) stop it: a finite T that leaves the exported model unsure where val was unsure.
    separated = np.array([0.1, 0.45, 0.55, 0.9])
    temperature, why = fit_temperature(y, separated)
    assert why is None and np.exp(-LOG_T_BOUND) < temperature < np.exp(LOG_T_BOUND)
    assert combine([separated], [1], temperature).min() > 0.05 and combine(
        [separated], [1], temperature).max() < 0.95
    # Confidently wrong: plain log-loss falls as T grows without end; the prior stops it.
    temperature, why = fit_temperature(y, np.array([0.99, 0.9, 0.1, 0.01]))
    assert why is None and 1 < temperature < np.exp(LOG_T_BOUND)


def plain_temperature(y: np.ndarray, prob: np.ndarray) -> float:
    """The temperature of ctscan 0.3: the val log-loss minimum, no targets, no prior."""
    logits = np.log(prob / (1 - prob))
    fitted = minimize_scalar(lambda t: log_loss(y, expit(logits / np.exp(t)), labels=[0, 1]),
                             bounds=(-LOG_T_BOUND, LOG_T_BOUND), method="bounded")
    return float(np.exp(fitted.x))


def test_on_small_val_splits_the_temperature_of_a_calibrated_model_stays_nearer_1():
    """A model already calibrated (T = 1 is right), val splits of 63 slices: the fitted T
    scatters less about 1 than the plain fit's (the spread of log T: 0.63 against 0.79)."""
    rng = np.random.default_rng(0)
    new, old = [], []
    for _ in range(200):
        score = rng.normal(0, 2, 63)  # the true log-odds, so p is calibrated
        y = (rng.random(63) < expit(score)).astype(int)
        prob = expit(score)
        new.append(fit_temperature(y, prob)[0])
        old.append(plain_temperature(y, prob))
    spread = [np.subtract(*np.percentile(np.log(t), [95, 5])) for t in (new, old)]
    assert spread[0] < 0.85 * spread[1]
    assert np.median(new) == pytest.approx(1.0, abs=0.15)


def test_the_temperature_interval_holds_the_fit_and_narrows_with_more_val():
    rng = np.random.default_rng(2)
    widths = []
    for n in (60, 600):
        y = rng.integers(0, 2, n)
        prob = combine([np.clip(0.5 + (y - 0.5) * 0.4 + rng.normal(0, 0.25, n), 0.01, 0.99)],
                       [1], 1 / 2)  # overconfident: T near 2
        low, high = temperature_interval(y, prob, np.arange(n))
        assert low < fit_temperature(y, prob)[0] < high
        widths.append(np.log(high / low))
    assert widths[1] < widths[0]


def test_the_exported_model_is_compared_with_the_best_trial_or_else_the_runner_up():
    assert _compared_weights({"weights": [0.5, 0.5, 0.0]}) == ([1.0, 0.0, 0.0], COMPARED_BEST)
    assert _compared_weights({"weights": [1.0, 0.0, 0.0]}) == ([0.0, 1.0, 0.0],
                                                               COMPARED_RUNNER_UP)


def _strong_overconfident_and_weak_smoothed(n: int, rng: np.random.Generator):
    """Labels, a member that ranks well (AUC about 0.87) with logits 8 times too large, and one
    that ranks poorly (about 0.77) with probabilities kept near 0.5, as label smoothing does."""
    truth = rng.normal(0, 2.5, n)
    y = (rng.random(n) < expit(truth)).astype(int)
    return (y, expit(8 * (truth + rng.normal(0, 0.7, n))),
            expit(0.3 * (truth + rng.normal(0, 2.5, n))))


def test_calibrated_selection_lets_an_overconfident_strong_member_win():
    """On raw probabilities the strong member's log-loss (1.65) is far worse than the weak
    one's (0.57), and selection gives it half the weight; each calibrated first (its own
    temperature, cross-fitted on val halves), it takes most of it, and the exported mean of
    calibrated members scores better on fresh data."""
    rng = np.random.default_rng(0)
    y, strong, weak = _strong_overconfident_and_weak_smoothed(400, rng)
    raw, _ = caruana_weights(y, [strong, weak])
    choice = choose_ensemble(y, [strong, weak])
    assert raw.tolist() == [0.5, 0.5] and choice["weights"][0] > 0.75
    assert choice["member_temperatures"][0] > 4  # its logits are 8 times too large
    y_new, strong_new, weak_new = _strong_overconfident_and_weak_smoothed(20_000, rng)
    calibrated_first = combine([strong_new, weak_new], choice["weights"], 1.0,
                               choice["member_temperatures"])
    as_before = combine([strong_new, weak_new], raw.tolist())
    assert log_loss(y_new, calibrated_first) < log_loss(y_new, np.clip(as_before, 1e-7, 1))
    assert roc_auc_score(y_new, calibrated_first) > roc_auc_score(y_new, as_before)


def test_combine_computes_what_the_exported_ensemble_outputs():
    torch.manual_seed(0)
    members = [torch.nn.Linear(4, 1), torch.nn.Linear(4, 1)]
    x = torch.randn(5, 4)
    with torch.no_grad():
        probs = [torch.sigmoid(m(x)).squeeze(1).numpy() for m in members]
        exported = torch.sigmoid(Ensemble(members, 1.7, [0.7, 0.3])(x)).squeeze(1).numpy()
        calibrated = torch.sigmoid(Ensemble(members, 1.7, [0.7, 0.3], [2.0, 0.5])(x))
    np.testing.assert_allclose(combine(probs, [0.7, 0.3], 1.7), exported, atol=1e-6)
    np.testing.assert_allclose(combine(probs, [0.7, 0.3], 1.7, [2.0, 0.5]),
                               calibrated.squeeze(1).numpy(), atol=1e-6)
    assert combine(probs[:1], [1.0]) is probs[0]  # one member, uncalibrated: its own
    assert combine([probs[0], None], [1.0, 0.0]) is probs[0]  # weight 0: never computed


def test_candidates_are_the_best_trial_then_the_next_best_whose_checkpoint_is_there(tmp_path):
    from data_utils.files import write_json
    from results.evaluate import ensemble_candidates

    def trial(trial_id: str, exists: bool = True, val_auc: float = 0.8,
              status: str = "completed", epochs: int = 4) -> dict:
        checkpoint = tmp_path / trial_id / "last.pt"
        if exists:
            checkpoint.parent.mkdir()
            checkpoint.write_bytes(b"weights")
        return {"trial_id": trial_id, "checkpoint": str(checkpoint), "params": {"lr": 0.01},
                "val_auc": val_auc, "status": status, "epochs": epochs}

    # trials.json lists trials best first; "gone" failed on resume after Ray replaced its
    # checkpoint, "never" reported nothing, "rung" was stopped by ASHA at its first rung (one
    # epoch, the grace period: flagged), "later" at a later rung, and "chance" is worse than
    # chance (kept out).
    trials = [trial("a", val_auc=0.95), trial("gone", exists=False), trial("b"),
              trial("rung", status="stopped early", epochs=1),
              trial("later", status="stopped early", epochs=2), trial("c", val_auc=0.6),
              trial("chance", val_auc=0.4),
              {"trial_id": "never", "checkpoint": None, "params": {}, "val_auc": float("nan"),
               "status": "error", "epochs": 0}]
    write_json(tmp_path / "trials.json", trials)
    best = {"trial_id": "a", "checkpoint": trials[0]["checkpoint"], "config": {"lr": 0.001}}
    search = SearchOptions(data="/data", base_config={"image_size": 32}, grace_period=1)
    got, excluded = ensemble_candidates(str(tmp_path), search, best, size=5)
    assert [c["trial_id"] for c in got] == ["a", "b", "rung", "later", "c"]
    assert got[0]["config"] == {"lr": 0.001} and got[1]["config"]["lr"] == 0.01
    assert got[1]["config"]["image_size"] == 32
    assert [c["first_rung"] for c in got] == [False, False, True, False, False]
    assert got[0]["val_auc"] == 0.95 and got[3]["epochs"] == 2
    assert excluded == []  # five found before "chance" was reached
    got, excluded = ensemble_candidates(str(tmp_path), search, best, 6)
    assert [c["trial_id"] for c in got] == ["a", "b", "rung", "later", "c"]
    assert [(e["trial_id"], e["reason"]) for e in excluded] == [
        ("chance", "no better than chance on val (AUC 0.5 or less)")]
    got, excluded = ensemble_candidates(str(tmp_path), search, best, 2)
    assert [c["trial_id"] for c in got] == ["a", "b"] and excluded == []


def test_the_compared_model_is_calibrated_as_the_chosen_one(monkeypatch):
    """With --calibrate both models get a temperature fitted on val, so the Brier scores set
    side by side in the report compare like with like."""
    import types

    import results.evaluate as evaluate_module

    rng = np.random.default_rng(1)
    y = rng.integers(0, 2, 400)
    honest = np.clip(0.5 + (y - 0.5) * 0.3 + rng.normal(0, 0.3, 400), 0.01, 0.99)
    members = {"a": combine([honest], [1], 1 / 3), "b": combine([honest[::-1]], [1], 1 / 2)}
    monkeypatch.setattr(evaluate_module, "_proba", lambda member, ds, rows: members[member][rows])
    rows = np.arange(400)
    val, test = rows[:200], rows[200:]
    scored = evaluate_module.val_then_test(["a", "b"], types.SimpleNamespace(labels=y), val,
                                           test, calibrate=True)
    compared = scored["compared"]
    assert scored["temperature"] != 1.0 and compared["temperature"] != 1.0
    assert {scored["k"], compared["k"]} == {1, 2}  # the ensemble beside the best trial
    weights = compared["weights"]
    expected, _ = fit_temperature(y[val], combine([members["a"][val], members["b"][val]],
                                                  weights))
    assert compared["temperature"] == expected
    np.testing.assert_allclose(compared["prob_test"], combine(
        [members["a"][test], members["b"][test]], weights, expected))


def test_a_threshold_rule_fixed_in_advance_reaches_its_sensitivity_on_val():
    from results.evaluate import choose_threshold

    rng = np.random.default_rng(4)
    y = rng.integers(0, 2, 200)
    prob = np.clip(0.5 + (y - 0.5) * 0.3 + rng.normal(0, 0.2, 200), 0, 1)
    rule = choose_threshold(y, prob, "sensitivity:0.95")
    assert rule["method"] == "sensitivity" and rule["target"] == 0.95
    assert np.mean(prob[y == 1] >= rule["value"]) >= 0.95
    assert choose_threshold(y, prob, 0.3) == {"method": "fixed", "value": 0.3}
    assert choose_threshold(y, prob, None)["method"] == "youden"
    # The ledger names the rule as the flag that set it.
    from results.ledger import describe_options

    assert describe_options({"ensemble": 5, "threshold": "sensitivity:0.95",
                             "patient_aggregate": "choose"}) == (
        "--ensemble 5 --threshold sensitivity:0.95 --patient-aggregate choose")
