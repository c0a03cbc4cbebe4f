import argparse
import json
import os
import signal
import subprocess
import sys
import time

import pytest
from helpers import make_class_folders, tree_snapshot

from ctscan.cli import main
from tuning.space import DEMO_SPACE


def test_inspect_json_has_the_documented_keys(tmp_path, capsys):
    root = make_class_folders(tmp_path / "data", 6)
    (root / "COVID" / "bad.png").write_bytes(b"\x89PNG broken")
    (root / "COVID" / "dup.png").write_bytes((root / "COVID" / "COVID (0).png").read_bytes())
    assert main(["inspect", str(root), "--json", "--image-size", "32"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["classes"] == {"non-COVID": 6, "COVID": 7}
    assert report["positive_class"] == "COVID"
    assert report["skipped"][0]["path"] == "COVID/bad.png" and report["skipped"][0]["reason"]
    assert report["duplicate_groups"] == [["COVID/COVID (0).png", "COVID/dup.png"]]
    assert report["modes"] == {"non-COVID": {"L": 6}, "COVID": {"L": 7}}
    assert report["warnings"] == ["1 file(s) could not be read and are skipped"]


def test_inspect_warns_when_mode_follows_the_label(tmp_path, capsys):
    root = make_class_folders(tmp_path / "data", 20)
    from PIL import Image  # every positive slice saved as RGB, as in the real data
    for f in (root / "COVID").iterdir():
        Image.open(f).convert("RGB").save(f)
    assert main(["inspect", str(root), "--image-size", "32"]) == 0
    out = capsys.readouterr().out
    assert "WARNING: image mode predicts the label" in out and "100% accuracy" in out
    assert "COVID" in out and "RGB 20" in out


def test_bad_input_exits_2_naming_the_path(tmp_path, capsys):
    assert main(["inspect", str(tmp_path / "missing")]) == 2
    assert f"{tmp_path / 'missing'}: no such file" in capsys.readouterr().err
    (tmp_path / "onlycovid" / "COVID").mkdir(parents=True)
    make_class_folders(tmp_path / "single", 2, classes=("COVID",))
    assert main(["split", str(tmp_path / "single"), "--out", str(tmp_path / "run")]) == 2
    assert "single: found only class 'COVID'" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_split_writes_split_json_and_leaves_data_alone(tmp_path, capsys):
    root = make_class_folders(tmp_path / "data", 30)
    before = tree_snapshot(root)
    run = tmp_path / "run"
    args = ["split", str(root), "--out", str(run), "--image-size", "32", "--split-seed", "5"]
    assert main(args) == 0
    split = json.loads((run / "split.json").read_text())
    assert split["seed"] == 5 and split["group_by"] == "duplicates"
    assert split["counts"]["test"] == {"non-COVID": 3, "COVID": 3}
    assert "wrote" in capsys.readouterr().out
    assert tree_snapshot(root) == before


def test_train_writes_checkpoints_tensorboard_and_resumes(tmp_path, capsys):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    root = make_class_folders(tmp_path / "data", 20)
    run = tmp_path / "run"
    args = ["train", str(root), "--out", str(run), "--group-by", "none", "--set", "epochs=2",
            "--set", "image_size=32", "--set", "batch_size=8"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "best epoch" in out and f"tensorboard --logdir {run}" in out
    assert {p.name for p in run.iterdir()} >= {"split.json", "config.yaml", "best.pt", "last.pt",
                                               "tensorboard"}
    events = EventAccumulator(str(run / "tensorboard")).Reload()
    assert {"auc/val", "loss/val", "loss/train", "train/lr", "speed/images_per_sec"} <= set(
        events.Tags()["scalars"])
    assert [e.step for e in events.Scalars("auc/val")] == [1, 2]
    assert events.Tags()["images"] == ["training_inputs_augmented"]

    # As a run of an older ctscan recorded it: no frames, units or group counts; ids renamed.
    record = json.loads((run / "split.json").read_text())
    old = {**{k: v for k, v in record.items() if k not in ("unit", "group_kinds", "groups")},
           "files": [{k: v for k, v in f.items() if k != "frame"} for f in record["files"]]}
    (run / "split.json").write_text(json.dumps(old))
    assert main(args) == 0  # same command again: resumes, and there is nothing left to do
    assert "epoch   1" not in capsys.readouterr().out
    assert json.loads((run / "split.json").read_text()) == old  # kept as it was recorded
    assert main([*args, "--set", "lr=0.1"]) == 2
    assert "holds a run with a different config" in capsys.readouterr().err


@pytest.mark.parametrize("flag, value, expected", [
    ("--num-samples", "0", "an integer in [1, inf)"),
    ("--num-samples", "-1", "an integer in [1, inf)"),
    ("--max-concurrent", "0", "an integer in [1, inf)"),
    ("--max-epochs", "0", "an integer in [1, inf)"),
    ("--image-size", "0", "an integer in [32, 2048]"),
    ("--image-size", "64.5", "an integer in [32, 2048]"),
    ("--split-seed", "-1", "an integer in [0, 4294967296)"),
    ("--ratios", "nan", "a number in [0, 1]"),
    ("--cpus-per-trial", "0", "a number in (0, inf)"),
    ("--reduction-factor", "1", "an integer in [2, inf)"),
    ("--bootstrap", "199", "an integer in [200, inf)"),
    ("--time-budget", "0s", "a positive duration like 90s, 30m or 2h"),
    ("--time-budget", "30x", "a positive duration like 90s, 30m or 2h"),
    ("--time-budget", "inf", "a positive duration like 90s, 30m or 2h")])
def test_tune_refuses_numbers_that_would_silently_become_defaults(flag, value, expected, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["tune", "--demo", flag, value, *(["0.7", "0.2"] if flag == "--ratios" else [])])
    assert exit_.value.code == 2
    assert f"argument {flag}: expected {expected}, got {value!r}" in capsys.readouterr().err


@pytest.mark.parametrize("argv, expected", [
    (["evaluate", "RUN", "--threshold", "nan"], "--threshold: expected a number in [0, 1]"),
    (["evaluate", "RUN", "--threshold", "2"], "--threshold: expected a number in [0, 1]"),
    (["evaluate", "RUN", "--bootstrap", "0"], "--bootstrap: expected an integer in [200, inf)"),
    (["split", "DATA", "--out", "OUT", "--split-seed", "-1"], "--split-seed: expected an integer"),
])
def test_other_commands_refuse_out_of_range_numbers(argv, expected, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    assert exit_.value.code == 2
    assert expected in capsys.readouterr().err


@pytest.mark.parametrize("override, message", [
    ("batch_size=1", "batch_size must be in [2, inf), got 1"),
    ("label_smoothing=5", "label_smoothing must be in [0, 0.5), got 5.0"),
    ("pos_weight=-1", "pos_weight must be in (0, inf), got -1.0"),
    ("head=[-5]", "head must be in [1, inf), got -5"),
    ("patience=0", "patience must be in [1, inf), got 0"),
    ("lr=.nan", "lr must be in (0, inf), got nan"),
])
def test_train_refuses_config_values_out_of_range_before_writing(tmp_path, override, message,
                                                                 capsys):
    root = make_class_folders(tmp_path / "data", 6)
    assert main(["train", str(root), "--set", override, "--out", str(tmp_path / "run")]) == 2
    assert capsys.readouterr().err.strip() == f"ctscan: error: {message}"
    assert not (tmp_path / "run").exists()


def test_a_time_budget_ends_the_search_which_is_still_scored(tmp_path, local_ray, capsys):
    """No --search-space and no GPU: the CPU space, which starts with the recipe; the budget
    stops the search long before 200 trials, and the winner is scored and exported as usual."""
    from tuning.space import CPU_SPACE

    root = make_class_folders(tmp_path / "data", 24)
    runs = tmp_path / "runs"
    assert main(["tune", str(root), "--time-budget", "15s", "--num-samples", "200",
                 "--max-epochs", "30", "--image-size", "32", "--storage-path", str(runs),
                 "--name", "b", "--group-by", "none", "--max-concurrent", "2",
                 "--bootstrap", "200", "--ensemble", "1"]) == 0  # ensembles: test_search
    out = capsys.readouterr().out
    assert f"no GPU in the Ray cluster: searching the CPU space {CPU_SPACE}" in out
    assert "the time budget ended the search" in out
    best = json.loads((runs / "b" / "best.json").read_text())
    assert best["budget_reached"] and best["time_budget_s"] == 15
    assert 1 <= best["trials"] < 200
    assert json.loads((runs / "b" / "search.json").read_text())["search_space"] == str(CPU_SPACE)
    trials = json.loads((runs / "b" / "trials.json").read_text())
    # Whether a trial is still running when the clock runs out depends on the machine's speed.
    budget = [t for t in trials if t["status"] == "budget"]
    assert best["trials_ended_by_budget"] == len(budget)
    assert f"{len(budget)} still running when the time budget ended" in out
    assert "report.html: " in out and "exported: " in out
    first = min(trials, key=lambda t: t["number"])["params"]
    assert (first["arch"], first["optimizer"], first["lr"], first["batch_size"]) == (
        "resnet18", "adamw", 1e-3, 32)
    report = (runs / "b" / "results" / "report.md").read_text()
    assert "Its time budget (15 s) was reached" in report
    assert (runs / "b" / "export" / "model.pt").is_file()


def test_only_tune_imports_ray():
    """Ray takes seconds to import; evaluate, export, predict and explain must not need it."""
    code = ("import sys\n"
            "from ctscan.cli import main\n"
            "import results.pipeline, results.predict, results.explain\n"
            "try:\n"
            "    main(['predict', '--help'])\n"
            "except SystemExit:\n"
            "    pass\n"
            "print(sorted(m for m in sys.modules if m == 'ray' or m.startswith('ray.')))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip().splitlines()[-1] == "[]"


def _signals_of(pid: int) -> str:
    """The ignored and blocked signal masks of a process, for a failure message."""
    with open(f"/proc/{pid}/status", encoding="utf-8") as f:
        lines = f.read().splitlines()
    return " ".join(line for line in lines if line.startswith(("SigIgn", "SigBlk")))


def test_ctrl_c_is_one_line_and_exit_130(tmp_path):
    root = make_class_folders(tmp_path / "data", 12)
    # patience=500: a val AUC of 1 from the first epoch would otherwise end training by itself
    # within a second, before the interrupt arrives. The child starts with SIGINT's default
    # action, as from a shell: an ignored SIGINT is inherited across exec, and Python then
    # installs no KeyboardInterrupt handler. That is the likeliest cause of two full-suite runs
    # where the child went on training after the signal; the message says if it happens again.
    train = subprocess.Popen([sys.executable, "-m", "ctscan", "train", str(root), "--set",
                              "image_size=32", "--set", "epochs=500", "--set", "patience=500",
                              "--out", str(tmp_path / "run")], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True,
                             preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    assert train.stdout.readline().strip()  # decoded and split: training starts
    while not (tmp_path / "run" / "last.pt").exists():  # an epoch done: something to resume
        assert train.poll() is None, train.stderr.read()
        time.sleep(0.2)
    signals = _signals_of(train.pid)
    train.send_signal(signal.SIGINT)
    try:
        _, err = train.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        train.kill()
        raise AssertionError(f"no exit 60 s after SIGINT; the child's {signals}") from None
    assert train.returncode == 130, signals
    assert err.strip().splitlines()[-1] == "ctscan: interrupted"
    assert "Traceback" not in err


def test_an_error_raised_while_stopping_for_ctrl_c_still_exits_130(monkeypatch, capsys):
    """Ctrl-C inside torch.save makes its zip writer's cleanup raise RuntimeError ("unexpected
    pos ..."), which would otherwise replace the interruption with a traceback and exit 1."""
    import ctscan.cli as cli

    def interrupted_while_saving(args):
        try:
            raise KeyboardInterrupt
        except KeyboardInterrupt:
            raise RuntimeError("[enforce fail at inline_container.cc:672] unexpected pos") from None

    monkeypatch.setattr(cli, "cmd_inspect", interrupted_while_saving)
    assert main(["inspect", "anywhere"]) == 130
    assert capsys.readouterr().err.strip().splitlines()[-1] == "ctscan: interrupted"


@pytest.mark.ray  # in the child
def test_ctrl_c_ends_a_search_resumable_and_never_scores_it(tmp_path):
    """Ctrl-C reaches the whole process group, as from a terminal: Ray stops the trials and
    saves its state, and ctscan exits 130 instead of scoring the unfinished search."""
    root = make_class_folders(tmp_path / "data", 12)
    run = tmp_path / "runs" / "s"
    tune = subprocess.Popen([sys.executable, "-m", "ctscan", "tune", str(root), "--search-space",
                             str(DEMO_SPACE), "--image-size", "32", "--num-samples", "4",
                             "--max-epochs", "20", "--storage-path", str(tmp_path / "runs"),
                             "--name", "s", "--group-by", "none"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    deadline = time.time() + 240
    while not list(run.glob("trial_*/checkpoint_*")):  # a trial has finished an epoch
        assert tune.poll() is None, tune.stderr.read()
        assert time.time() < deadline, "the search made no progress"
        time.sleep(0.5)
    os.killpg(tune.pid, signal.SIGINT)
    _, err = tune.communicate(timeout=120)
    assert tune.returncode == 130, err
    assert err.strip().splitlines()[-1] == "ctscan: interrupted"
    assert not (run / "best.json").exists() and not (run / "results").exists()
    assert list(run.glob("experiment_state-*.json"))  # what --resume restores from


def test_a_search_interrupted_before_its_first_trial_is_resumed_or_its_name_reused(
        tmp_path, local_ray, monkeypatch, capsys):
    """Ctrl-C during Ray's start-up leaves search.json and split.json but no Ray Tune state."""
    import tuning.search

    root = make_class_folders(tmp_path / "data", 12)
    run = tmp_path / "runs" / "early"
    (tmp_path / "space.yaml").write_text("lr: {loguniform: [1.0e-3, 1.0e-2]}\n")
    args = [str(root), "--search-space", str(tmp_path / "space.yaml"), "--storage-path",
            str(tmp_path / "runs"), "--name", "early", "--image-size", "32", "--num-samples", "1",
            "--max-epochs", "1", "--group-by", "none", "--bootstrap", "200", "--ensemble", "1"]

    def interrupted(*_args, **_kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(tuning.search, "run_search", interrupted)
    assert main(["tune", *args]) == 130
    assert (run / "search.json").exists() and not (run / "tuner.pkl").exists()
    capsys.readouterr()
    assert main(["tune", *args]) == 130  # the name is free again: not "already holds a search"
    assert "holds a search that never started a trial" in capsys.readouterr().out
    monkeypatch.undo()
    assert main(["tune", "--resume", str(run), "--bootstrap", "200", "--ensemble", "1"]) == 0
    assert f"search early in {run} never started a trial: starting it" in capsys.readouterr().out
    assert json.loads((run / "best.json").read_text())["trials"] == 1


def test_threshold_takes_a_number_or_a_target_sensitivity():
    from ctscan.cli import threshold_rule

    assert threshold_rule("0.4") == 0.4
    assert threshold_rule("sensitivity:0.950") == "sensitivity:0.95"
    for bad in ("sensitivity:2", "sensitivity:", "1.5", "youden"):
        with pytest.raises(argparse.ArgumentTypeError, match="expected a number in"):
            threshold_rule(bad)


@pytest.mark.parametrize("method, said", [("fixed", "threshold 1.000 (fixed by --threshold)"),
                                          ("youden", "threshold 1.000 (youden, chosen on val)")])
def test_the_threshold_is_said_as_it_was_chosen(method, said, tmp_path, capsys):
    from ctscan.cli import print_results

    metrics = {"test": {"n": 4, "metrics": {"accuracy": {"value": 0.5, "ci95": [0.2, 0.8]}}},
               "threshold": {"value": 1.0, "method": method}}
    (tmp_path / "results").mkdir()
    (tmp_path / "results" / "metrics.json").write_text(json.dumps(metrics))
    print_results(str(tmp_path), tmp_path / "results")
    assert said in capsys.readouterr().out
