"""What evaluation chooses on val: how many trials to average, and the temperature."""

import numpy as np
import pytest
import torch
from sklearn.metrics import log_loss

from ctmodels import Ensemble
from results.evaluate import choose_ensemble, combine, fit_temperature
from tuning.records import SearchOptions


def test_the_ensemble_size_with_the_best_val_auc_is_chosen_and_ties_go_to_fewer():
    y = np.array([0, 0, 0, 1, 1, 1])
    best = np.array([0.1, 0.2, 0.6, 0.5, 0.7, 0.9])  # one pair out of order: AUC 8/9
    fixer = np.array([0.1, 0.1, 0.1, 0.9, 0.9, 0.9])  # averaged in, all pairs in order
    worse = np.array([0.9, 0.9, 0.9, 0.1, 0.1, 0.1])
    k, aucs = choose_ensemble(y, [best, fixer, worse])
    assert k == 2 and aucs[0] == pytest.approx(8 / 9) and aucs[1] == 1.0
    k, aucs = choose_ensemble(y, [fixer, best])  # 1.0 alone and 1.0 averaged: a tie
    assert k == 1 and aucs == [1.0, 1.0]


def test_temperature_softens_overconfident_probabilities_and_lowers_the_log_loss():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 400)
    honest = np.clip(0.5 + (y - 0.5) * 0.4 + rng.normal(0, 0.25, 400), 0.01, 0.99)
    overconfident = combine([honest], 1 / 3)  # logits tripled
    temperature, why = fit_temperature(y, overconfident)
    assert temperature > 1.5 and why is None
    assert log_loss(y, combine([overconfident], temperature)) < log_loss(y, overconfident)
    assert fit_temperature(y, honest)[0] == pytest.approx(1.0, abs=0.35)


def test_no_temperature_on_a_perfectly_separated_val_split_or_at_the_bound_of_its_search():
    y = np.array([0, 0, 1, 1])
    # Separated: the log-loss falls towards T = 0; the fit would stop at the bound, 0.05.
    assert fit_temperature(y, np.array([0.1, 0.45, 0.55, 0.9])) == (
        1.0, "the validation split is perfectly separated, so its log-loss keeps falling as the "
             "temperature goes to 0")
    # Confidently wrong: the log-loss falls as T grows without end (probabilities towards 0.5).
    temperature, why = fit_temperature(y, np.array([0.99, 0.9, 0.1, 0.01]))
    assert temperature == 1.0 and why.startswith("the fitted temperature ran to the bound")


def test_combine_computes_what_the_exported_ensemble_outputs():
    torch.manual_seed(0)
    members = [torch.nn.Linear(4, 1), torch.nn.Linear(4, 1)]
    x = torch.randn(5, 4)
    with torch.no_grad():
        probs = [torch.sigmoid(m(x)).squeeze(1).numpy() for m in members]
        exported = torch.sigmoid(Ensemble(members, 1.7)(x)).squeeze(1).numpy()
    np.testing.assert_allclose(combine(probs, 1.7), exported, atol=1e-6)
    assert combine(probs[:1]) is probs[0]  # one member, uncalibrated: its own probabilities


def test_candidates_are_the_best_trial_then_the_next_best_whose_checkpoint_is_there(tmp_path):
    from data_utils.files import write_json
    from results.evaluate import ensemble_candidates

    def trial(trial_id: str, exists: bool = True) -> dict:
        checkpoint = tmp_path / trial_id / "last.pt"
        if exists:
            checkpoint.parent.mkdir()
            checkpoint.write_bytes(b"weights")
        return {"trial_id": trial_id, "checkpoint": str(checkpoint), "params": {"lr": 0.01}}

    # trials.json lists trials best first; "gone" failed on resume after Ray replaced its
    # checkpoint, and "never" reported nothing.
    trials = [trial("a"), trial("gone", exists=False), trial("b"), trial("c"),
              {"trial_id": "never", "checkpoint": None, "params": {}}]
    write_json(tmp_path / "trials.json", trials)
    best = {"trial_id": "a", "checkpoint": trials[0]["checkpoint"], "config": {"lr": 0.001}}
    search = SearchOptions(data="/data", base_config={"image_size": 32})
    got = ensemble_candidates(str(tmp_path), search, best, size=5)
    assert [c["trial_id"] for c in got] == ["a", "b", "c"]
    assert got[0]["config"] == {"lr": 0.001} and got[1]["config"]["lr"] == 0.01
    assert got[1]["config"]["image_size"] == 32
    assert [c["trial_id"] for c in ensemble_candidates(str(tmp_path), search, best, 2)] == [
        "a", "b"]


def test_the_compared_model_is_calibrated_as_the_chosen_one(monkeypatch):
    """With --calibrate both models get a temperature fitted on val, so the Brier scores set
    side by side in the report compare like with like."""
    import types

    import results.evaluate as evaluate_module

    rng = np.random.default_rng(1)
    y = rng.integers(0, 2, 400)
    honest = np.clip(0.5 + (y - 0.5) * 0.3 + rng.normal(0, 0.3, 400), 0.01, 0.99)
    members = {"a": combine([honest], 1 / 3), "b": combine([honest[::-1]], 1 / 2)}
    monkeypatch.setattr(evaluate_module, "_proba", lambda member, ds, rows: members[member][rows])
    rows = np.arange(400)
    val, test = rows[:200], rows[200:]
    scored = evaluate_module.val_then_test(["a", "b"], types.SimpleNamespace(labels=y), val,
                                           test, calibrate=True)
    assert scored["k"] == 1 and scored["temperature"] > 1.5  # "a" alone, overconfident
    compared = scored["compared"]
    assert compared["k"] == 2 and compared["temperature"] != 1.0
    expected, _ = fit_temperature(y[val], combine([members["a"][val], members["b"][val]]))
    assert compared["temperature"] == expected
    np.testing.assert_allclose(compared["prob_test"], combine(
        [members["a"][test], members["b"][test]], expected))
