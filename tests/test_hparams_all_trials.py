"""Every trial in every view: each searched key has a value in every trial's HParams session and
in trials.json, and after evaluation every trial's run carries its weight in the exported model,
its status and its epochs. Read back with TensorBoard's own HParams backend (the code behind the
HParams tab), driven as Ray drives the search's callback; no search runs here.
"""

import json
from types import SimpleNamespace

import optuna
import pytest
from helpers import hparams_data, read_events
from tensorboard import context
from tensorboard.backend.event_processing import data_provider, plugin_event_multiplexer
from tensorboard.plugins import base_plugin
from tensorboard.plugins.hparams import api_pb2, backend_context, list_session_groups, metadata
from test_tensorboard import BASE, search_folder, trial_data

from tuning import monitor
from tuning.monitor import (
    EPOCHS_TRAINED,
    EXPERIMENT_EVENTS,
    HPARAMS_METRICS,
    SCALARS,
    STATUS_CODE,
    STATUS_CODES,
    WEIGHT,
    exported_model_run,
    hparam_infos,
    log_report,
)
from tuning.records import SearchOptions, summarize
from tuning.space import DEMO_SPACE, IDLE, decode_params, load_space, params_in_force
from tuning.trial_tensorboard import TrialTensorBoard, declare_search_once

# Optuna's params of four trials of the demo space (search_space_demo.yaml): its SGD branch
# draws no weight_decay, its AdamW branch no momentum.
TRIALS = {
    "adamw1": {"arch": "resnet18", "head": "[]", "dropout": 0.1, "batch_size": 32,
               "aug_strength": 0.5, "optimizer": "adamw", "lr[adamw]": 1e-3,
               "weight_decay[adamw]": 1e-3},
    "adamw2": {"arch": "resnet34", "head": "[64]", "dropout": 0.2, "batch_size": 64,
               "aug_strength": 0.1, "optimizer": "adamw", "lr[adamw]": 3e-3,
               "weight_decay[adamw]": 2e-5},
    "sgd1": {"arch": "resnet18", "head": "[]", "dropout": 0.0, "batch_size": 32,
             "aug_strength": 0.9, "optimizer": "sgd", "lr[sgd]": 0.05, "momentum[sgd]": 0.9},
    "sgd2": {"arch": "resnet34", "head": "[64]", "dropout": 0.3, "batch_size": 64,
             "aug_strength": 0.0, "optimizer": "sgd", "lr[sgd]": 0.01, "momentum[sgd]": 0.85},
}
ALL_STATUSES = [api_pb2.STATUS_UNKNOWN, api_pb2.STATUS_SUCCESS, api_pb2.STATUS_FAILURE,
                api_pb2.STATUS_RUNNING]


def session_groups(logdir) -> tuple[api_pb2.Experiment, dict[str, api_pb2.SessionGroup]]:
    """The experiment and the session groups (by run name) as TensorBoard's HParams tab gets
    them: its multiplexer reads the folder, its backend answers /experiment and
    /session_groups."""
    multiplexer = plugin_event_multiplexer.EventMultiplexer()
    multiplexer.AddRunsFromDirectory(str(logdir))
    multiplexer.Reload()
    provider = data_provider.MultiplexerDataProvider(multiplexer, str(logdir))
    backend = backend_context.Context(base_plugin.TBContext(data_provider=provider,
                                                            logdir=str(logdir)))
    ctx = context.RequestContext()
    experiment = backend.experiment_from_metadata(
        ctx, "", True, backend.hparams_metadata(ctx, ""),
        backend.hparams_from_data_provider(ctx, "", limit=None))
    request = api_pb2.ListSessionGroupsRequest(allowed_statuses=ALL_STATUSES, start_index=0,
                                               slice_size=100)
    groups = list_session_groups.Handler(ctx, backend, "", request).run().session_groups
    return experiment, {g.name: g for g in groups}


def in_domain(info: api_pb2.HParamInfo, value) -> bool:
    kind = value.WhichOneof("kind")
    if info.HasField("domain_interval"):
        interval = info.domain_interval
        return interval.min_value <= value.number_value <= interval.max_value
    return getattr(value, kind) in list(info.domain_discrete)


class FakeTrial(SimpleNamespace):
    """What TrialTensorBoard reads of a Ray Trial."""

    def __init__(self, root, trial_id: str, config: dict):
        super().__init__(trial_id=trial_id, local_path=str(root / f"trial_{trial_id}"),
                         config=config, status="RUNNING", last_result={})


def search_run(tmp_path, ended: dict[str, tuple[int, bool]]):
    """A run of the demo space whose trials ran as `ended` says (trial id -> epochs, whether it
    ended by itself), logged by the search's callback."""
    run, options, space = search_folder(tmp_path, DEMO_SPACE.read_text())
    callback = TrialTensorBoard(space, options, trial_data())
    trials = [FakeTrial(run, name, config) for name, config in TRIALS.items()]
    for trial in trials:
        callback.on_trial_start(0, trials, trial)
        for epoch in range(1, ended[trial.trial_id][0] + 1):
            trial.last_result = {"epoch": epoch, **dict.fromkeys(SCALARS, 0.5 + epoch / 10),
                                 "final_epoch": ended[trial.trial_id][1]}
            callback.on_trial_result(epoch, trials, trial, trial.last_result)
        callback.on_trial_complete(epoch, trials, trial)
    callback.on_experiment_end(trials)
    return run, options, space


def test_every_trial_of_a_mixed_sgd_adamw_search_has_every_searched_key(tmp_path):
    run, options, space = search_run(tmp_path, {"adamw1": (3, True), "adamw2": (1, False),
                                                "sgd1": (3, True), "sgd2": (1, False)})
    experiment, groups = session_groups(run)
    infos = {h.name: h for h in experiment.hparam_infos}
    assert set(infos) == set(space.searched_keys()) >= {"weight_decay", "momentum"}
    assert sorted(groups) == [f"trial_{name}" for name in sorted(TRIALS)]
    shown = [m.name.tag for m in experiment.metric_infos]
    for name, group in groups.items():
        # Parallel coordinates leave out a trial that lacks any column: none does.
        assert set(group.hparams) == set(infos), name
        assert all(in_domain(infos[k], v) for k, v in group.hparams.items()), name
        assert {m.name.tag for m in group.metric_values} == set(shown), name
    # Off its branch, the value in force (the config default) or the stand-in, and a valid
    # config whichever it is.
    assert groups["trial_sgd1"].hparams["weight_decay"].number_value == pytest.approx(1e-4)
    assert groups["trial_adamw1"].hparams["momentum"].number_value == IDLE
    assert groups["trial_sgd1"].hparams["momentum"].number_value == pytest.approx(0.9)
    assert groups["trial_adamw1"].hparams["weight_decay"].number_value == pytest.approx(1e-3)
    # The marks as of the search's end: nobody is in an exported model yet.
    marks = {name: {m.name.tag: m.value for m in g.metric_values} for name, g in groups.items()}
    assert marks["trial_adamw1"][STATUS_CODE] == STATUS_CODES["completed"]
    assert marks["trial_adamw2"][STATUS_CODE] == STATUS_CODES["stopped early"]
    assert marks["trial_sgd1"][EPOCHS_TRAINED] == 3 and marks["trial_sgd2"][EPOCHS_TRAINED] == 1
    assert {m[WEIGHT] for m in marks.values()} == {0}


def test_a_trial_shows_its_params_in_force_within_the_declared_domain():
    """Drawn as the search draws them, every config of every shipped branch shows a value for
    every searched key, inside the domain the experiment declares, and trains as drawn."""
    space = load_space(DEMO_SPACE, BASE)
    infos = {h.name: h for h in hparam_infos(space.spec, BASE)}
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(0))
    options = SearchOptions(data="unused", base_config=BASE)
    for _ in range(40):
        trial = study.ask()
        params = decode_params({**space(trial), **trial.params})
        config = options.trial_config(params)
        shown = params_in_force(params, config, space.searched_keys())
        assert set(space.searched_keys()) <= set(shown)
        # The stand-ins are valid values: the same model trains (momentum does not act).
        assert options.trial_config(shown).acting() == config.acting()
        for key in space.searched_keys():
            domain = infos[key]
            value = shown[key]
            if domain.HasField("domain_interval"):
                assert domain.domain_interval.min_value <= value <= domain.domain_interval.max_value
            else:
                assert (str(value) if not isinstance(value, list) else json.dumps(value)) in list(
                    domain.domain_discrete)
        study.tell(trial, 0.5)


def test_trials_json_and_best_json_hold_every_searched_key(tmp_path):
    run, options, space = search_run(tmp_path, {name: (1, True) for name in TRIALS})
    records = [{"trial_id": name, "params": decode_params(config), "status": "completed",
                "epochs": 1, "val_auc": 0.9 - i / 10, "precision": "fp32", "checkpoint": None,
                "history": [{"epoch": 1, "train_loss": 0.5, "val_loss": 0.5, "val_auc": 0.9,
                             "val_accuracy": 0.8, "val_f1": 0.8, "lr": 1e-3}]}
               for i, (name, config) in enumerate(TRIALS.items())]
    results = SimpleNamespace(get_best_result=lambda **_: SimpleNamespace(
        path=str(run / "trial_000-resnet18-adamw1")))
    best = summarize(options, results, records)
    written = json.loads((run / "trials.json").read_text())
    for record in written:
        assert set(space.searched_keys()) <= set(record["params"]), record["trial_id"]
    by_id = {r["trial_id"]: r["params"] for r in written}
    assert by_id["sgd1"]["weight_decay"] == pytest.approx(1e-4)
    assert by_id["adamw1"]["momentum"] == IDLE
    assert set(best["searched"]) == set(space.searched_keys())
    assert best["config"]["momentum"] == IDLE  # one value per key in every table


def test_after_evaluation_every_trial_carries_its_weight_status_and_epochs(tmp_path,
                                                                           monkeypatch):
    run, options, _ = search_run(tmp_path, {"adamw1": (3, True), "adamw2": (1, False),
                                            "sgd1": (3, True), "sgd2": (2, True)})
    # A search an older ctscan declared, without the marks: the evaluation declares them.
    with monkeypatch.context() as older:
        older.setattr(monitor, "HPARAMS_METRICS", {"best_val_auc": "best val AUC"})
        (run / EXPERIMENT_EVENTS).unlink()
        declare_search_once(str(run), load_space(DEMO_SPACE).spec)
    declared = hparams_data(read_events(run), metadata.EXPERIMENT_TAG).experiment
    assert [m.name.tag for m in declared.metric_infos] == ["best_val_auc"]
    trials = [{"trial_id": name, "folder": f"trial_{name}", "epochs": epochs, "status": status}
              for name, epochs, status in [("adamw1", 3, "completed"),
                                           ("adamw2", 1, "stopped early"),
                                           ("sgd1", 3, "completed"), ("sgd2", 2, "budget")]]
    metrics = {"ensemble": {"members": [{"trial_id": "sgd1", "weight": 0.81},
                                        {"trial_id": "adamw2", "weight": 0.19}]}}
    results = run / "results"
    (results / "winner_trial_sgd1").mkdir(parents=True)
    (results / "winner_trial_sgd1" / "events.out.tfevents.1.old").write_bytes(b"")
    log_report(str(run), results, metrics, trials, {}, [], "# Report\n")

    experiment, groups = session_groups(run)
    assert [m.name.tag for m in experiment.metric_infos] == list(HPARAMS_METRICS)
    marks = {name.removeprefix("trial_"): {m.name.tag: m.value for m in g.metric_values}
             for name, g in groups.items()}
    assert {k: v[WEIGHT] for k, v in marks.items()} == pytest.approx(
        {"adamw1": 0, "adamw2": 0.19, "sgd1": 0.81, "sgd2": 0})
    assert {k: v[STATUS_CODE] for k, v in marks.items()} == {
        "adamw1": 3, "adamw2": 1, "sgd1": 3, "sgd2": 2}
    assert {k: v[EPOCHS_TRAINED] for k, v in marks.items()} == {
        "adamw1": 3, "adamw2": 1, "sgd1": 3, "sgd2": 2}

    # The exported model's run is named for what it is, and says which trials with which
    # weights; the report run of an earlier evaluation is gone.
    assert exported_model_run({"a": 1.0}) == "exported_model"
    assert sorted(p.parent.name for p in results.glob("*/*tfevents*")) == [
        "exported_ensemble_of_2"]
    [text] = read_events(results / "exported_ensemble_of_2").Tensors("report/text_summary")
    text = text.tensor_proto.string_val[0].decode()
    assert ("the weighted ensemble of 2 trials: `trial_sgd1` (weight 0.81), `trial_adamw2` "
            "(weight 0.19)") in text

    # A second evaluation replaces the marks; TensorBoard reads the last.
    metrics["ensemble"]["members"] = [{"trial_id": "adamw1", "weight": 1.0}]
    log_report(str(run), results, metrics, trials, {}, [], "# Report\n")
    _, groups = session_groups(run)
    weights = {name: {m.name.tag: m.value for m in g.metric_values}[WEIGHT]
               for name, g in groups.items()}
    assert weights == {"trial_adamw1": 1, "trial_adamw2": 0, "trial_sgd1": 0, "trial_sgd2": 0}
