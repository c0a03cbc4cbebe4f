"""`ctscan tune` on a local 2-CPU Ray: search space checks, end to end, retries."""

import json
import re
import shutil
from pathlib import Path

import numpy as np
import optuna
import pytest
import torch
from helpers import (
    hparams_data,
    read_events,
    recording_trainable,
    stop_at_the_first_test_probability,
    tiny_trial_data,
)
from tensorboard.plugins.hparams import api_pb2, metadata

import results.evaluate as evaluate_module
from ctscan.cli import print_results
from data_utils.cache import load_dataset
from data_utils.demo import make_demo_data
from data_utils.runfolder import StorageError
from data_utils.sources import DataError
from data_utils.split import split_dataset
from results.pipeline import report_run
from results.predict import predict_paths
from tuning.config import ConfigError, make_config
from tuning.monitor import (
    EPOCHS_TRAINED,
    EXPERIMENT_EVENTS,
    SCALARS,
    STATUS_CODE,
    WEIGHT,
    exported_model_run,
)
from tuning.records import SearchOptions, prepare_run
from tuning.search import PrunedAwareOptunaSearch, run_search, trainable
from tuning.space import (
    CPU_SPACE,
    DEFAULT_SPACE,
    DEMO_SPACE,
    NUMBER,
    decode_params,
    load_space,
    startup_trials,
)
from tuning.train import trial_data

TINY_SPACE = """
arch: resnet18
head: {choice: [[], [16]]}
lr: {loguniform: [1.0e-5, 5.0e-2]}
batch_size: 32
aug_strength: {uniform: [0.0, 0.5]}
"""


@pytest.mark.parametrize("text, error", [
    ("lr: {loguniform: [1.0e-3, 1.0e-5]}", "low 0.001 > high 1e-05"),
    ("lr: {loguniform: [1.0e-5, 3.0e-3]", "not valid YAML"),
    ("lr: {normal: [0, 1]}", "expected one of ('choice', 'uniform', 'loguniform', 'randint')"),
    ("arch: {choice: []}", "choice needs a non-empty list"),
    ("learning_rate: 0.1", "unknown config key 'learning_rate'"),
    ("arch: {choice: [resnet18, vgg]}", "arch must be one of"),
    ("lr: {loguniform: [0, 1]}", "loguniform needs low > 0"),
    ("batch_size: {randint: [a, 4]}", "randint needs [low, high] numbers"),
    ("image_size: {choice: [64, 128]}", "image_size is a setting of the run, not searched; use "
                                        "`ctscan tune --image-size` instead"),
    ("epochs: 5", "use `ctscan tune --max-epochs`"),
    ("num_workers: 2", "use `ctscan tune --cpus-per-trial`"),
    ("optimizer: {choice: {sgd: {seed: {randint: [0, 3]}}}}", "use `ctscan tune --seed`"),
    ("batch_size: {uniform: [16, 64]}", "batch_size is an integer; draw it with randint or "
                                        "choice, not uniform"),
    ("dropout: {uniform: [0.0, 1.0]}", "dropout must be in [0, 1), got 1.0"),
    ("freeze_backbone_epochs: {choice: [0, 2]}", "freeze_backbone_epochs needs pretrained"),
    ("optimizer: {choice: {sgd: {lr: {loguniform: [0, 1]}}}}", "loguniform needs low > 0"),
    ("optimizer: {choice: {adamw: {optimizer: sgd}}}", "optimizer is searched twice"),
    ("optimizer: {choice: {adamw: {lr: 0.1}}}\nlr: 0.2", "lr is searched twice"),
    ("start_with: [{lr: 0.5}]\nlr: {loguniform: [1e-4, 1e-2]}",
     "start_with[0]: lr=0.5 is outside the space's loguniform [0.0001, 0.01]"),
    ("start_with: [{dropout: 0.2}]\nlr: {loguniform: [1e-4, 1e-2]}",
     "start_with[0]: dropout is not searched on this branch of the space"),
    ("start_with: [{optimizer: sgd, weight_decay: 0.1}]\n"
     "optimizer: {choice: {adamw: {weight_decay: {uniform: [0, 1]}}, sgd: }}",
     "start_with[0]: weight_decay is not searched on this branch"),
    # Every trial would train the same config; refused before any work, not after the search.
    ("arch: resnet18\nlr: 0.001\nhead: [64]", "searches nothing, every key is fixed"),
])
def test_bad_space_files_are_clear_errors(tmp_path, text, error):
    (tmp_path / "space.yaml").write_text(text)
    with pytest.raises(ConfigError, match=str(tmp_path / "space.yaml")) as err:
        load_space(tmp_path / "space.yaml")
    assert error in str(err.value)


def test_yaml_numbers_without_a_dot_are_numbers(tmp_path):
    (tmp_path / "space.yaml").write_text("lr: {loguniform: [1e-5, 3e-3]}\n"
                                         "weight_decay: 1e-4\n")
    space = load_space(tmp_path / "space.yaml")
    assert space.spec == {"lr": {"loguniform": [1e-5, 3e-3]}, "weight_decay": 1e-4}


def test_freezing_is_allowed_with_pretrained_weights(tmp_path):
    (tmp_path / "space.yaml").write_text("freeze_backbone_epochs: {choice: [0, 1, 2]}\n")
    load_space(tmp_path / "space.yaml", {"weights": "imagenet"})


def _draw(space, n: int, seed: int = 0) -> list[dict]:
    """n configs drawn the way the search draws them: Optuna asks, the space suggests."""
    study = optuna.create_study(direction="maximize", sampler=optuna.samplers.RandomSampler(seed))
    for point in space.start:
        study.enqueue_trial(point)
    configs = []
    for _ in range(n):
        trial = study.ask()
        fixed = space(trial)  # suggests the parameters first
        configs.append(decode_params({**trial.params, **fixed}))
        study.tell(trial, 0.5)
    return configs


@pytest.mark.parametrize("path", [DEFAULT_SPACE, CPU_SPACE, DEMO_SPACE])
def test_shipped_spaces_start_with_the_recipe_and_keep_rates_per_optimizer(path):
    space = load_space(path, {"image_size": 64})
    assert "freeze_backbone_epochs" not in space.searched_keys()  # default weights are random
    assert space.param_names("lr") == ["lr[adamw]", "lr[sgd]"]
    configs = _draw(space, 300)
    recipe = make_config({})
    first = make_config(configs[0])
    assert (first.arch, first.head, first.optimizer, first.lr, first.weight_decay,
            first.batch_size, first.aug_strength, first.dropout) == (
        recipe.arch, recipe.head, recipe.optimizer, recipe.lr, recipe.weight_decay,
        recipe.batch_size, recipe.aug_strength, recipe.dropout)
    adamw = load_space(path).spec["optimizer"]["choice"]["adamw"]["lr"]["loguniform"]
    sgd = load_space(path).spec["optimizer"]["choice"]["sgd"]["lr"]["loguniform"]
    assert adamw[1] < 0.05 <= sgd[1] and adamw[0] < sgd[0]
    by_optimizer = {"adamw": [], "sgd": []}
    for values in configs:
        config = make_config({**values, "image_size": 64})  # every draw is a valid config
        by_optimizer[config.optimizer].append(config.lr)
    assert by_optimizer["sgd"] and by_optimizer["adamw"]
    assert all(sgd[0] <= lr <= sgd[1] for lr in by_optimizer["sgd"])  # no SGD at AdamW rates
    assert all(adamw[0] <= lr <= adamw[1] for lr in by_optimizer["adamw"])
    assert all("momentum" not in c for c in configs if c["optimizer"] == "adamw")


def test_lists_travel_as_json_and_start_up_trials_scale_with_the_budget():
    assert decode_params({"head": "[512, 128]", "lr[sgd]": 0.1}) == {"head": [512, 128],
                                                                     "lr": 0.1}
    assert [startup_trials(n) for n in (4, 8, 12, 20, 32, 100)] == [2, 2, 3, 4, 7, 10]


@pytest.fixture(scope="module")
def demo_search(tmp_path_factory, local_ray):
    """A finished 6-trial search; the data folder is hidden while it runs. What each trial saw is
    noted in the folder `seen` beside the storage path."""
    tmp = tmp_path_factory.mktemp("search")
    (tmp / "seen").mkdir()
    root = make_demo_data(tmp / "data", n_per_class=40, size=64)
    ds = load_dataset(root, 32, cache_dir=tmp / "cache", progress=False)
    split = split_dataset(ds, seed=0)
    hidden = root.rename(tmp / "hidden")  # trials read pixels from the cache, never PNGs
    (tmp / "space.yaml").write_text(TINY_SPACE)
    options = SearchOptions(
        data=str(root), num_samples=6, max_epochs=3, grace_period=1, reduction_factor=2,
        max_concurrent=2, storage_path=str(tmp / "runs"), name="demo",
        search_space=str(tmp / "space.yaml"),
        base_config={"image_size": 32, "epochs": 3, "num_workers": 1},
        split={"ratios": [0.7, 0.2, 0.1], "seed": 0, "group_by": "duplicates",
               "positive_class": None})
    prepare_run(options, ds, split)
    data = trial_data(ds, split)
    best = run_search(options, data, trainable_fn=recording_trainable(tmp / "seen"))
    hidden.rename(root)  # evaluation, later, reads the test files
    return options, best, ds, split, data


def test_search_finds_a_best_trial_and_writes_best_json(demo_search):
    options, best, *_ = demo_search
    on_disk = json.loads((Path(options.run_dir) / "best.json").read_text())
    assert on_disk == best
    assert best["trials"] == 6 and best["errored_trials"] == 0
    assert best["trials_ended_by_budget"] == 0  # no time budget
    assert 0.5 < best["val_metrics"]["val_auc"] <= 1
    assert best["config"]["image_size"] == 32 and best["config"]["head"] in ([], [16])
    assert not Path(best["checkpoint"]).is_absolute()  # the run folder can be moved
    checkpoint = Path(options.run_dir) / best["checkpoint"]
    assert checkpoint.is_file()
    saved = torch.load(checkpoint, weights_only=True)
    assert saved["metrics"]["val_auc"] == pytest.approx(best["val_metrics"]["val_auc"])


def test_the_first_trial_is_the_recipe(demo_search):
    options, *_ = demo_search
    trials = json.loads((Path(options.run_dir) / "trials.json").read_text())
    first = min(trials, key=lambda t: t["number"])
    assert first["params"] == {"arch": "resnet18", "batch_size": 32, "head": [], "lr": 1e-3,
                               "aug_strength": 0.5}  # TrainConfig's defaults, in TINY_SPACE


def test_asha_and_optuna_judge_trials_by_their_best_epoch_so_far(demo_search):
    options, best, *_ = demo_search
    assert best["trials_stopped_early"] >= 1
    searcher = PrunedAwareOptunaSearch()
    searcher.restore_from_dir(options.run_dir)
    trials = searcher._ot_study.trials
    states = [t.state for t in trials]
    assert len(states) == 6
    assert states.count(optuna.trial.TrialState.PRUNED) == best["trials_stopped_early"]
    assert states.count(optuna.trial.TrialState.COMPLETE) == 6 - best["trials_stopped_early"]
    records = {r["trial_id"]: r for r in json.loads(
        (Path(options.run_dir) / "trials.json").read_text())}
    by_params = {json.dumps(r["params"], sort_keys=True): r for r in records.values()}
    for trial in trials:
        record = by_params[json.dumps(decode_params({**trial.params, "arch": "resnet18",
                                                     "batch_size": 32}), sort_keys=True)]
        aucs = [h["val_auc"] for h in record["history"]]
        best_so_far = list(np.maximum.accumulate(aucs))
        reported = list(trial.intermediate_values.values())  # Ray passes the last result
        assert reported and reported == best_so_far[:len(reported)]  # to on_trial_complete
        if trial.state == optuna.trial.TrialState.COMPLETE:
            assert trial.value == max(aucs)


def test_only_the_best_weights_per_trial_are_kept(demo_search):
    options, *_ = demo_search
    trials = json.loads((Path(options.run_dir) / "trials.json").read_text())
    assert len(list(Path(options.run_dir).glob("trial_*"))) == len(trials) == 6
    for trial in trials:
        checkpoint = Path(options.run_dir) / trial["checkpoint"]
        # No resume state (optimizer) left: the weights and the history, one checkpoint.
        assert sorted(p.name for p in checkpoint.parent.parent.glob("checkpoint_*/*")) == [
            "best.pt", "history.json"]
        aucs = [h["val_auc"] for h in trial["history"]]
        assert torch.load(checkpoint, weights_only=True)["epoch"] == aucs.index(max(aucs))


def test_trials_map_the_cache_and_share_worker_processes(demo_search):
    """Every trial reads its pixels from a memory map of the node's copy of the cache, and Ray
    hands it row numbers, not pixels (the 48 slices alone are 48 KiB); and a worker process runs
    one trial after another, so 6 trials start fewer than 6 (each import of torch costs
    seconds)."""
    options, *_ = demo_search
    seen = [json.loads(p.read_text())
            for p in (Path(options.storage_path).parent / "seen").iterdir()]
    assert len(seen) == 6
    assert all(s["mapped"] == s["node_copy"] and s["handed_bytes"] < 8192 for s in seen)
    assert len({s["pid"] for s in seen}) < 6


def test_trials_never_saw_the_test_split(demo_search):
    *_, ds, split, data = demo_search
    given = {bytes(img) for img in data.images()[np.r_[data.train_rows, data.val_rows]]}
    test = {bytes(ds.images[i]) for i in split.indices("test")}
    assert not given & test
    assert len(data.train_labels) + len(data.val_labels) == len(ds) - len(split.indices("test"))


def test_tensorboard_shows_what_matters_per_trial_and_how_each_ended(demo_search):
    options, best, *_ = demo_search
    run = Path(options.run_dir)
    # Declared once, before the first trial, under a name a resumed search finds.
    assert [p.name for p in run.glob("*tfevents*")] == [EXPERIMENT_EVENTS]
    experiment = hparams_data(read_events(run), metadata.EXPERIMENT_TAG).experiment
    assert [h.name for h in experiment.hparam_infos] == ["head", "lr", "aug_strength"]
    assert experiment.metric_infos[0].name.tag == SCALARS["best_val_auc"]
    trials = json.loads((run / "trials.json").read_text())
    folders = [run / f"trial_{t['number']:03d}-resnet18-{t['trial_id']}" for t in trials]
    assert sorted(folders) == sorted(run.glob("trial_*"))
    ended = {"completed": api_pb2.STATUS_SUCCESS, "stopped early": api_pb2.STATUS_UNKNOWN,
             "budget": api_pb2.STATUS_RUNNING, "error": api_pb2.STATUS_FAILURE}
    for trial, folder in zip(trials, folders, strict=True):
        events = read_events(folder)
        # No Ray bookkeeping: the scalars and the marks HParams sorts trials by.
        assert sorted(events.Tags()["scalars"]) == sorted(
            [*SCALARS.values(), WEIGHT, STATUS_CODE, EPOCHS_TRAINED])
        assert events.Tags()["images"] == ["training_inputs_augmented"]
        # HParams shows a metric's last value: best_val_auc's is the trial's best epoch.
        assert [e.step for e in events.Scalars(SCALARS["best_val_auc"])] == list(
            range(1, trial["epochs"] + 1))
        assert events.Scalars(SCALARS["best_val_auc"])[-1].value == pytest.approx(
            trial["val_auc"])
        start = hparams_data(events, metadata.SESSION_START_INFO_TAG).session_start_info
        assert set(start.hparams) == {"head", "lr", "aug_strength"}
        end = hparams_data(events, metadata.SESSION_END_INFO_TAG).session_end_info
        assert end.status == ended[trial["status"]]
        [config] = events.Tensors("config/text_summary")
        config = config.tensor_proto.string_val[0].decode()
        assert "momentum" not in config  # AdamW's trials
        assert f"    lr: {trial['params']['lr']:.4g}" in config.splitlines()
    winner = read_events(next(run.glob(f"trial_*-{best['trial_id']}")))
    assert winner.Scalars(SCALARS["best_val_auc"])[-1].value == pytest.approx(
        best["val_metrics"]["val_auc"])


def test_a_trial_that_crashes_is_retried_from_its_checkpoint(tmp_path, local_ray):
    root, data = tiny_trial_data(tmp_path)
    (tmp_path / "space.yaml").write_text("lr: {choice: [0.001]}\n")
    marker = tmp_path / "crashed"

    def crash_once(params, data, options):
        """The real trainable, but the first run in this search dies right after epoch 1."""
        import tuning.search as search

        real_train_trial = search.train_trial

        def train_then_crash(config, data, out_dir, report, **kwargs):
            def report_then_crash(metrics, *rest):
                report(metrics, *rest)
                if not marker.exists():
                    marker.touch()
                    raise RuntimeError("injected crash after epoch 1")
            return real_train_trial(config, data, out_dir, report_then_crash, **kwargs)

        search.train_trial = train_then_crash
        trainable(params, data, options)

    options = SearchOptions(
        data=str(root), num_samples=1, max_epochs=2, max_failures=1,
        storage_path=str(tmp_path / "runs"), name="retry",
        search_space=str(tmp_path / "space.yaml"),
        base_config={"image_size": 32, "epochs": 2, "num_workers": 1, "patience": 99})
    best = run_search(options, data, trainable_fn=crash_once)
    assert marker.exists() and best["errored_trials"] == 0
    [trial] = Path(options.run_dir).glob("trial_*")
    results = (trial / "result.json").read_text().splitlines()
    epochs = [json.loads(line)["epoch"] for line in results]
    assert epochs == [1, 2]  # resumed after epoch 1, did not start over ([1, 1, 2])


def _every_trial_may_join(trial: dict) -> None:
    """For `evaluate.kept_out`: every trial with a checkpoint is a candidate, whatever the val
    AUCs of this small search (13 val slices in a few near-duplicate groups, where a trial's
    AUC is often 0, 0.5 or 1) turn out to be. The tests using it are of the ensemble's
    machinery; which trials may join is tested in test_model_choice."""
    return None


@pytest.fixture(scope="module")
def copied_run(demo_search, tmp_path_factory) -> tuple[Path, dict]:
    """A copy of the search's run folder (without its results), evaluated and exported once
    while the original is gone: (the copy, its metrics.json). The module's tests of what an
    evaluation writes read this one evaluation. (`ctscan export` on a run: test_storage.)"""
    options, *_ = demo_search
    tmp = tmp_path_factory.mktemp("copied")
    copy = tmp / "copied"
    shutil.copytree(options.run_dir, copy, ignore=shutil.ignore_patterns("results", "export"))
    gone = Path(options.run_dir).rename(tmp / "original-gone")
    try:
        # A module fixture is set up before the test's isolated cache: its own, so no ledger of
        # the user's cache (nor an earlier session's) counts this test split's looks.
        with pytest.MonkeyPatch.context() as patch:
            patch.setenv("CTSCAN_CACHE_DIR", str(tmp / "cache"))
            patch.setattr(evaluate_module, "kept_out", _every_trial_may_join)
            out = report_run(str(copy), resamples=200, gradcams=2, ensemble=2,
                             cache_dir=tmp / "cache")
    finally:
        gone.rename(options.run_dir)  # the module's other tests read the original
    assert out == copy / "results"
    return copy, json.loads((out / "metrics.json").read_text())


def test_a_copied_run_folder_evaluates_and_exports_on_its_own(copied_run):
    """best.json and trials.json name checkpoints relative to the run folder: a copy reads its
    own, and needs the original no more."""
    copy, metrics = copied_run
    assert metrics["ensemble"]["candidates"] == 2  # the runner-up's checkpoint was found too
    assert all(not Path(m["checkpoint"]).is_absolute() for m in metrics["ensemble"]["members"])
    assert (copy / "export" / "model.pt").is_file()


def test_every_look_at_the_test_split_is_on_record_and_a_change_of_choices_warns(copied_run,
                                                                                 tmp_path, capsys):
    evaluated_once, first = copied_run
    run = shutil.copytree(evaluated_once, tmp_path / "run")  # the module's copy stays as it is
    assert first["evaluations"]["count"] == 1
    assert "has been scored 1 time**, by this evaluation: the first" in (
        run / "results/report.md").read_text()
    capsys.readouterr()
    print_results(str(run), report_run(str(run), resamples=200, gradcams=0, ensemble=1))
    err = capsys.readouterr().err
    assert "warning: this test split was scored before with other choices" in err
    assert "--ensemble 2" in err and "report the first evaluation" in err
    ledger = [json.loads(line) for line in
              (run / "results/evaluations.jsonl").read_text().splitlines()]
    assert [e["options"]["ensemble"] for e in ledger] == [2, 1]
    assert ledger[1]["members"] == {json.loads((run / "best.json").read_text())["trial_id"]: 1.0}
    metrics = json.loads((run / "results/metrics.json").read_text())
    assert ledger[1]["test"]["roc_auc"] == metrics["test"]["metrics"]["roc_auc"]["value"]
    assert metrics["evaluations"]["count"] == 2
    assert "has been scored 2 times" in (run / "results/report.md").read_text()
    assert ("The test split has been scored 2 times, this evaluation included: the first "
            "evaluation is the one to report.") in (run / "export/model_card.md").read_text()


def test_the_ledger_follows_the_test_split_into_another_run_or_a_deleted_results(copied_run,
                                                                                tmp_path):
    """The count belongs to the test split: a copy of the run whose results/ was deleted, and
    then another copy under another name (as a new search on the same split would be), each
    continue it from the ledger kept with the cache."""
    evaluated_once, _ = copied_run
    counts = []
    for name in ("again", "another"):
        run = shutil.copytree(evaluated_once, tmp_path / name)
        shutil.rmtree(run / "results")
        report_run(str(run), resamples=200, gradcams=0, cache_dir=tmp_path / "cache")
        counts.append(json.loads((run / "results/metrics.json").read_text())["evaluations"])
    assert [c["count"] for c in counts] == [1, 2]
    ledger = [json.loads(line) for line in (run / "results/evaluations.jsonl").read_text()
              .splitlines()]
    assert [e["run"] for e in ledger] == ["again", "another"]
    assert "(in another run, again, on the same test split)" in (
        run / "results/report.md").read_text()
    [shared] = (tmp_path / "cache" / "test-ledgers").iterdir()
    assert shared.read_text() == (run / "results/evaluations.jsonl").read_text()


def test_a_damaged_ledger_stops_evaluation_before_the_test_split_is_read(copied_run, tmp_path,
                                                                        monkeypatch):
    import results.pipeline as pipeline

    evaluated_once, _ = copied_run
    run = shutil.copytree(evaluated_once, tmp_path / "run")
    ledger = run / "results/evaluations.jsonl"
    monkeypatch.setattr(pipeline, "evaluate_run", lambda *a, **k: pytest.fail("test split read"))
    for damage in ('{"time": "2026-12-07T10:00:00+00:00"}\n', "{cut short\n"):
        ledger.write_text(ledger.read_text().splitlines()[0] + "\n" + damage)
        with pytest.raises(StorageError, match=r"evaluations.jsonl: (line 2 is not a record|not "
                                               r"valid JSON \(line 1)"):
            report_run(str(run), resamples=200, gradcams=0)


def _resumed(run: Path) -> None:
    """What `ctscan tune --resume` leaves when it trains the best trial on: a new checkpoint,
    named in best.json and trials.json."""
    best = json.loads((run / "best.json").read_text())
    old = Path(best["checkpoint"]).parent
    shutil.copytree(run / old, run / old.parent / "checkpoint_000099")
    for name in ("best.json", "trials.json"):
        text = (run / name).read_text().replace(f"{old.as_posix()}/",
                                                 f"{old.parent.as_posix()}/checkpoint_000099/")
        (run / name).write_text(text)


def test_an_evaluation_after_the_search_was_resumed_counts_as_one_of_a_changed_model(
        copied_run, tmp_path, capsys):
    from ctscan.cli import _warn_if_evaluated

    evaluated_once, first = copied_run
    # The same run (its folder's name): a resumed search continues in its own folder.
    run = shutil.copytree(evaluated_once, tmp_path / evaluated_once.name)
    _warn_if_evaluated(str(run))
    assert "was scored 1 time; resuming changes the model" in capsys.readouterr().err
    _resumed(run)
    options = first["evaluations"]["options"]
    print_results(str(run), report_run(str(run), resamples=options["bootstrap"], gradcams=0,
                                       ensemble=options["ensemble"]))
    err = capsys.readouterr().err
    assert "scored before with other choices or another model" in err
    assert "a model that has changed since" in err
    metrics = json.loads((run / "results/metrics.json").read_text())
    assert metrics["evaluations"]["count"] == 2
    ledger = [json.loads(line) for line in
              (run / "results/evaluations.jsonl").read_text().splitlines()]
    assert ledger[0]["options"] == ledger[1]["options"]
    assert ledger[0]["model"] != ledger[1]["model"]
    assert "a model that has changed since" in (run / "results/report.md").read_text()


def test_an_evaluation_is_on_record_before_the_test_split_is_read(copied_run, tmp_path,
                                                                  monkeypatch):
    evaluated_once, _ = copied_run
    run = shutil.copytree(evaluated_once, tmp_path / "run")
    ledger = run / "results/evaluations.jsonl"

    def on_record():
        entries = [json.loads(line) for line in ledger.read_text().splitlines()]
        assert len(entries) == 2 and entries[1]["test"] is None

    stop_at_the_first_test_probability(monkeypatch, on_record)
    with pytest.raises(KeyboardInterrupt):
        report_run(str(run), resamples=200, gradcams=0, ensemble=2)
    monkeypatch.undo()
    report_run(str(run), resamples=200, gradcams=0, ensemble=2)
    metrics = json.loads((run / "results/metrics.json").read_text())
    assert metrics["evaluations"]["count"] == 3  # the one stopped half-way counts
    assert "stopped before it finished scoring" in (run / "results/report.md").read_text()


def test_predict_and_explain_on_test_files_are_recorded_with_a_notice(demo_search, copied_run,
                                                                     tmp_path, capsys):
    from ctscan.cli import main

    options, *_ = demo_search
    evaluated_once, _ = copied_run
    run = shutil.copytree(evaluated_once, tmp_path / "run")
    split = json.loads((run / "split.json").read_text())
    root = Path(options.data)
    test_file, train_file = (root / next(e["path"] for e in split["files"] if e["split"] == name)
                             for name in ("test", "train"))
    ledger = Path(json.loads((run / "export/config.json").read_text())["test_split"]["ledger"])
    before = ledger.read_text()
    capsys.readouterr()
    assert main(["predict", str(run / "export"), str(train_file)]) == 0
    assert "notice" not in capsys.readouterr().err and ledger.read_text() == before
    assert main(["predict", str(run / "export"), str(test_file), str(train_file)]) == 0
    assert ("notice: 1 of these files are in the test split this model was scored on (1 time); "
            f"this look is recorded in {ledger}") in capsys.readouterr().err
    assert main(["explain", str(run / "export"), str(test_file), "--out",
                 str(tmp_path / "cams")]) == 0
    assert "notice: 1 of these files" in capsys.readouterr().err
    looks = [json.loads(line) for line in ledger.read_text().splitlines()][-2:]
    assert [(e["kind"], e["files"], e["run"]) for e in looks] == [("predict", 1, "copied"),
                                                                  ("explain", 1, "copied")]
    # The next evaluation lists them, and they are not counted as scorings.
    report_run(str(run), resamples=200, gradcams=0, ensemble=2,
               cache_dir=ledger.parent.parent)
    metrics = json.loads((run / "results/metrics.json").read_text())
    assert metrics["evaluations"]["count"] == 2
    assert [e["kind"] for e in metrics["evaluations"]["other_looks"]] == ["predict", "explain"]
    assert "`ctscan predict` on 1 of its files" in (run / "results/report.md").read_text()


@pytest.fixture(scope="module")
def evaluated(copied_run) -> Path:
    """The results folder of the module's one evaluation; its export is beside it."""
    return copied_run[0] / "results"


def test_evaluation_writes_metrics_plots_report_and_export(demo_search, evaluated):
    _, best, ds, split, _ = demo_search
    metrics = json.loads((evaluated / "metrics.json").read_text())
    assert metrics["trial_id"] == best["trial_id"]
    assert metrics["test"]["n"] == len(split.indices("test"))
    assert metrics["val"]["n"] == len(split.indices("val"))
    for m in metrics["test"]["metrics"].values():
        assert m["ci95"][0] <= m["value"] <= m["ci95"][1]
    for name in ("roc", "pr", "confusion", "training_curves", "hparams"):
        assert (evaluated / f"{name}.png").stat().st_size > 1000
    report = (evaluated / "report.md").read_text()
    assert "95% CI" in report and best["trial_id"] in report and "gradcam/" in report
    export = evaluated.parent / "export"
    assert {"model.pt", "model.torchscript.pt", "config.json", "config.yaml",
            "model_card.md"} <= {p.name for p in export.iterdir()}
    winner = read_events(evaluated / exported_model_run(
        {m["trial_id"]: m["weight"] for m in metrics["ensemble"]["members"]}))
    assert {f"results/{name}" for name in ("roc", "pr", "confusion", "training_curves",
                                           "hparams")} < set(winner.Tags()["images"])
    assert any(tag.startswith("gradcam/") for tag in winner.Tags()["images"])
    assert winner.Tags()["tensors"] == ["report/text_summary"]
    [text] = winner.Tensors("report/text_summary")
    text = text.tensor_proto.string_val[0].decode()
    # Relative image links 404 in TensorBoard, headings have no anchors: neither is left.
    assert "![" not in text and "](#" not in text
    assert "Images tab, tag `results/roc`" in text


def test_predict_on_the_test_files_reproduces_evaluate(demo_search, evaluated):
    options, *_ = demo_search
    evaluated_probs = {r["path"]: r["prob"]
                       for r in json.loads((evaluated / "test_predictions.json").read_text())}
    root = Path(options.data)
    rows = predict_paths(evaluated.parent / "export", [root / p for p in evaluated_probs],
                         progress=False)
    assert [r["error"] for r in rows] == [None] * len(rows)
    for row in rows:
        rel = Path(row["path"]).relative_to(root).as_posix()
        assert row["prob"] == pytest.approx(evaluated_probs[rel], abs=1e-6)


def test_an_exported_weighted_ensemble_reproduces_the_evaluated_probabilities(
        demo_search, tmp_path, monkeypatch):
    """Whatever weights evaluation settles on, predict with the exported files gives the
    probabilities it scored: here two trials weighted 0.7 and 0.3."""
    from results.pipeline import export_run

    options, *_ = demo_search
    monkeypatch.setattr(evaluate_module, "kept_out", _every_trial_may_join)
    real = evaluate_module.choose_ensemble
    monkeypatch.setattr(evaluate_module, "choose_ensemble", lambda *a: {
        **real(*a), "weights": [0.7, 0.3], "chosen": "ensemble"})
    metrics, arrays = evaluate_module.evaluate_run(options.run_dir, resamples=10, ensemble=2)
    assert [m["weight"] for m in metrics["ensemble"]["members"]] == [0.7, 0.3]
    export_run(options.run_dir, tmp_path / "export", metrics, arrays["members"])
    root = Path(options.data)
    rows = predict_paths(tmp_path / "export", [root / p for p in arrays["test_paths"]],
                         progress=False)
    np.testing.assert_allclose([r["prob"] for r in rows], arrays["prob_test"], atol=1e-6)


def test_ensemble_and_threshold_are_chosen_on_val_before_test_is_touched(demo_search,
                                                                          monkeypatch):
    """Every choice (the ensemble weights, the thresholds) sees val only, and the test images are
    predicted only after all of them, for the chosen model and the one it is compared with."""
    options, _, ds, split, _ = demo_search
    monkeypatch.setattr(evaluate_module, "kept_out", _every_trial_may_join)
    events = []
    real_predict = evaluate_module.predict_proba
    monkeypatch.setattr(evaluate_module, "predict_proba",
                        lambda model, x, *a: events.append(("predict", x.clone())) or
                        real_predict(model, x, *a))
    for name in ("choose_threshold", "choose_ensemble"):
        real = getattr(evaluate_module, name)
        monkeypatch.setattr(evaluate_module, name, lambda y, *rest, real=real: events.append(
            ("choose", len(y))) or real(y, *rest))
    metrics, _ = evaluate_module.evaluate_run(options.run_dir, resamples=10, ensemble=3)
    val = sorted(map(bytes, ds.images[split.indices("val")]))
    test = sorted(map(bytes, ds.images[split.indices("test")]))

    def kind(event: tuple) -> str:
        if event[0] == "choose":
            return "choose" if event[1] == len(val) else "choose on other data"
        images = sorted(map(bytes, event[1].numpy()))
        return "val" if images == val else "test" if images == test else "other"

    kinds = [kind(e) for e in events]
    first_test = kinds.index("test")
    candidates = metrics["ensemble"]["candidates"]
    assert candidates >= 2  # the search kept several trials' checkpoints: a real choice
    assert kinds[:first_test] == ["val"] * candidates + ["choose"] * 3
    # The members of the chosen model and of the one it is compared with, once each.
    used = {m["trial_id"] for m in metrics["ensemble"]["members"]} | set(
        metrics["compared"]["members"])
    assert kinds[first_test:] == ["test"] * len(used)


def test_a_changed_test_file_stops_evaluation_naming_it(demo_search):
    options, _, ds, split, _ = demo_search
    victim = Path(options.data) / ds.paths[split.indices("test")[0]]
    original = victim.read_bytes()
    try:
        victim.write_bytes(original[:-20] + b"\0" * 20)  # still a file, different bytes
        name = ds.paths[split.indices("test")[0]]
        with pytest.raises(DataError, match=f"test slice {re.escape(name)} of split.json is "
                           "missing, changed or no longer readable"):
            evaluate_module.evaluate_run(options.run_dir, resamples=10)
    finally:
        victim.write_bytes(original)


def test_best_json_describes_its_checkpoint_on_ties_and_failed_trials_are_listed(tmp_path,
                                                                                 local_ray):
    def tied_then_failing(params, data, options):
        """No training: trial 0 reports val AUCs 0.8, 0.9, 0.9 (a tie); trial 1 fails at epoch 2.
        Each epoch's checkpoint holds the best weights so far, as train_trial's do."""
        import tempfile

        from ray import tune

        number = params[NUMBER]
        aucs = [0.8, 0.9, 0.9] if number == 0 else [0.5, None]
        history = []
        for epoch, auc in enumerate(aucs, 1):
            if auc is None:
                raise RuntimeError(f"trial {number} failed at epoch {epoch}")
            history.append({"epoch": epoch, "train_loss": 1.0, "val_loss": 1 / epoch,
                            "val_accuracy": 0.5, "val_auc": auc,
                            "best_val_auc": max(aucs[:epoch]), "val_f1": 0.5, "lr": 0.1})
            with tempfile.TemporaryDirectory() as folder:
                best_epoch = aucs.index(max(aucs[:epoch]))  # the first to reach the best
                torch.save({"epoch": best_epoch}, Path(folder) / "best.pt")
                (Path(folder) / "history.json").write_text(json.dumps(history))
                tune.report({**history[-1], "final_epoch": epoch == len(aucs),
                             "resume_epoch": 0},
                            checkpoint=tune.Checkpoint.from_directory(folder))

    root, data = tiny_trial_data(tmp_path)
    (tmp_path / "space.yaml").write_text("lr: {loguniform: [1.0e-4, 1.0e-2]}\n")
    options = SearchOptions(
        data=str(root), num_samples=2, max_epochs=3, scheduler="fifo", max_failures=0,
        storage_path=str(tmp_path / "runs"), name="ties",
        search_space=str(tmp_path / "space.yaml"), base_config={"image_size": 32})
    best = run_search(options, data, trainable_fn=tied_then_failing)
    # Of two tied epochs, the weights kept are the first's; best.json describes that one.
    checkpoint = Path(options.run_dir) / best["checkpoint"]
    assert torch.load(checkpoint, weights_only=True)["epoch"] + 1 == best["best_epoch"] == 2
    assert best["val_metrics"]["val_loss"] == 1 / 2
    assert best["errored_trials"] == 1
    failed = next(t for t in json.loads((Path(options.run_dir) / "trials.json").read_text())
                  if t["status"] == "error")
    assert failed["number"] == 1 and failed["epochs"] == 1
    assert failed["error"] == "RuntimeError: trial 1 failed at epoch 2"
    assert "trial 1 failed at epoch 2" in Path(failed["error_file"]).read_text()


def test_a_trial_that_errored_after_reporting_is_pruned_for_tpe_not_failed():
    def space(trial):
        trial.suggest_float("lr", 1e-4, 1e-2, log=True)

    searcher = PrunedAwareOptunaSearch(space=space, metric="best_val_auc", mode="max", seed=0)
    for trial_id in ("reported", "silent"):
        assert searcher.suggest(trial_id) is not None
    searcher.on_trial_result("reported", {"best_val_auc": 0.8, "training_iteration": 1})
    searcher.on_trial_complete("reported", error=True)
    searcher.on_trial_complete("silent", error=True)
    states = [t.state for t in searcher._ot_study.trials]
    assert states == [optuna.trial.TrialState.PRUNED, optuna.trial.TrialState.FAIL]
    assert searcher._ot_study.trials[0].intermediate_values == {1: 0.8}
