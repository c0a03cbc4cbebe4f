"""What TensorBoard shows, read back with TensorBoard's own loading code.

A search's runs are checked on tests/test_search.py's search (`test_tensorboard_*` there), which
runs anyway; these tests need no search: the search's callback is driven here as Ray drives it.
"""

import json
import os
import re
import signal
import urllib.request
from dataclasses import asdict
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
from helpers import hparams_data, read_events
from matplotlib.figure import Figure
from PIL import Image
from tensorboard import plugin_util
from tensorboard.plugins.hparams import api_pb2, metadata
from torch.utils.tensorboard import SummaryWriter

from data_utils import runfolder
from tuning.config import make_config
from tuning.monitor import (
    EXPERIMENT_EVENTS,
    SCALARS,
    STATUS_CODE,
    STATUS_CODES,
    declare_search,
    end_session,
    log_report,
    open_run,
    start_session,
    start_tensorboard,
    tensorboard_reporter,
)
from tuning.records import SearchOptions
from tuning.space import SearchSpace, load_space
from tuning.train import TrialData
from tuning.trial_tensorboard import TrialTensorBoard, declare_search_once

# Integers (batch_size), lists (head), ranges that differ by branch (lr), a key only one branch
# searches (momentum).
SPACE = """
arch: resnet18
head: {choice: [[], [16]]}
batch_size: {choice: [64, 16, 128]}
aug_strength: {uniform: [0.0, 0.5]}
optimizer:
  choice:
    adamw:
      lr: {loguniform: [1.0e-4, 1.0e-2]}
    sgd:
      lr: {loguniform: [1.0e-3, 1.0e-1]}
      momentum: {uniform: [0.8, 0.95]}
"""


BASE = {"image_size": 32}


def trial_data() -> TrialData:
    """Eight blank training images, for the callback's grid of inputs."""
    return TrialData.from_arrays(np.zeros((8, 32, 32), np.uint8), np.arange(8) % 2,
                                 np.zeros((2, 32, 32), np.uint8), np.arange(2) % 2)


def search_folder(root: Path, space_text: str) -> tuple[Path, SearchOptions, SearchSpace]:
    """root/run as `ctscan tune` leaves it before its first trial: search.json, the run's copy
    of its space, and the HParams experiment declared."""
    options = SearchOptions(data="unused", storage_path=str(root), name="run",
                            base_config=BASE)
    run = Path(options.run_dir)
    run.mkdir(parents=True)
    (run / runfolder.SEARCH).write_text(json.dumps(asdict(options)))
    (run / runfolder.SPACE).write_text(space_text)
    space = load_space(run / runfolder.SPACE, BASE)
    declare_search_once(str(run), space.spec)
    return run, options, space


def test_a_search_declares_every_searched_key_with_its_domain(tmp_path):
    (tmp_path / "space.yaml").write_text(SPACE)
    declare_search(tmp_path, load_space(tmp_path / "space.yaml").spec, {"image_size": 32})
    experiment = hparams_data(read_events(tmp_path), metadata.EXPERIMENT_TAG).experiment
    infos = {h.name: h for h in experiment.hparam_infos}
    assert list(infos) == ["head", "batch_size", "aug_strength", "optimizer", "lr", "momentum"]
    # The pane opens with five ticked, differing first: the five that matter most, not the
    # first five of the alphabet (aug_strength, batch_size, head, lr, momentum).
    assert {k for k, h in infos.items() if h.differs} == {"lr", "optimizer", "batch_size", "head",
                                                          "aug_strength"}
    # Integers as text ("64", not "64.000"), in numeric order.
    assert list(infos["batch_size"].domain_discrete) == ["16", "64", "128"]
    assert list(infos["head"].domain_discrete) == ["[]", "[16]"]
    assert list(infos["optimizer"].domain_discrete) == ["adamw", "sgd"]
    lr = infos["lr"].domain_interval
    assert (lr.min_value, lr.max_value) == (1e-4, 1e-1)  # both optimizers' ranges
    # AdamW's trials show momentum 0, the stand-in of a key that does not act.
    momentum = infos["momentum"].domain_interval
    assert (momentum.min_value, momentum.max_value) == (0, 0.95)
    assert [m.name.tag for m in experiment.metric_infos][0] == SCALARS["best_val_auc"]


def test_a_session_holds_the_trials_values_and_how_it_ended(tmp_path):
    writer = SummaryWriter(str(tmp_path))
    start_session(writer, {"batch_size": 32, "head": [16], "lr": 0.01, "arch": "resnet18",
                           "momentum": 0}, ["batch_size", "head", "lr", "momentum"])
    end_session(writer, "stopped early", 2)
    events = read_events(tmp_path)
    values = hparams_data(events, metadata.SESSION_START_INFO_TAG).session_start_info.hparams
    assert {k: v.WhichOneof("kind") for k, v in values.items()} == {
        "batch_size": "string_value", "head": "string_value", "lr": "number_value",
        "momentum": "number_value"}
    assert (values["batch_size"].string_value, values["head"].string_value) == ("32", "[16]")
    end = hparams_data(events, metadata.SESSION_END_INFO_TAG).session_end_info
    assert end.status == api_pb2.STATUS_UNKNOWN
    # Running from its start, stopped at its last epoch.
    assert [(e.step, e.value) for e in events.Scalars(STATUS_CODE)] == [
        (0, STATUS_CODES["running"]), (2, STATUS_CODES["stopped early"])]


def test_train_logs_only_the_scalars_a_trial_logs(tmp_path):
    images = torch.randint(0, 256, (8, 32, 32), dtype=torch.uint8)
    report = tensorboard_reporter(tmp_path, make_config({"image_size": 32}), images,
                                  torch.arange(8) % 2)
    report({"epoch": 1, **dict.fromkeys(SCALARS, 0.5), "final_epoch": False}, [], [])
    tags = read_events(tmp_path).Tags()
    assert sorted(tags["scalars"]) == sorted(SCALARS.values()) and len(SCALARS) <= 12
    # Grouped on TensorBoard's pages: the losses together, the AUCs together.
    assert {t.split("/")[0] for t in SCALARS.values()} == {"loss", "auc", "val", "train",
                                                            "speed"}
    assert tags["images"] == ["training_inputs_augmented"]


def _text(events, tag: str) -> str:
    """A text summary as the Text tab gets it: the markdown, and the HTML it renders it to."""
    [event] = events.Tensors(f"{tag}/text_summary")
    text = event.tensor_proto.string_val[0].decode()
    return text, plugin_util.markdown_to_safe_html(text)


def test_the_report_run_has_figures_gradcams_and_a_report_text_without_broken_links(tmp_path):
    run, _, _ = search_folder(tmp_path, SPACE)
    overlay = tmp_path / "Covid (1)_gradcam.png"
    Image.fromarray(np.zeros((20, 30, 3), np.uint8)).save(overlay)
    fig = Figure()
    fig.add_subplot().plot([0, 1])
    report = ("# Report\n\nSee [Limitations](#limitations).\n\n![ROC curve](roc.png)\n\n"
              "![Grad-CAM of Covid (1)](gradcam/Covid%20%281%29_gradcam.png)\n\n"
              "![Some plot](other.png)\n\n## Limitations\n")
    metrics = {"ensemble": {"members": [{"trial_id": "abc", "weight": 1.0}]}}
    log_report(str(run), run / "results", metrics, [], {"roc": fig}, [overlay], report)
    events = read_events(run / "results" / "exported_model")
    assert sorted(events.Tags()["images"]) == ["gradcam/Covid (1)_gradcam", "results/roc"]
    assert events.Images("gradcam/Covid (1)_gradcam")[0].width == 30
    assert events.Tags()["tensors"] == ["report/text_summary"]
    text, html = _text(events, "report")
    # Relative links 404 in TensorBoard and headings have no ids there: no <img>, no #anchor.
    assert "<img" not in html and 'href="#' not in html and "<a" not in html
    assert "See Limitations." in text
    assert "*ROC curve: Images tab, tag `results/roc`.*" in text
    assert "*Grad-CAM of Covid (1): Images tab, tag `gradcam/Covid (1)_gradcam`.*" in text
    assert "*Some plot: `other.png`, beside report.md.*" in text
    assert text.startswith("**Exported model**: trial `abc` (weight 1.00)")


def test_the_config_text_is_short_and_holds_only_the_keys_that_apply(tmp_path):
    images = torch.randint(0, 256, (8, 32, 32), dtype=torch.uint8)
    adamw = make_config({"image_size": 32, "lr": 0.0012345678901234567, "lr_schedule": "constant"})
    sgd = make_config({"image_size": 32, "optimizer": "sgd", "momentum": 0.876543210987654})
    for name, config in (("adamw", adamw), ("sgd", sgd)):
        open_run(tmp_path / name, config, images, torch.arange(8) % 2).close()
    adamw_text, adamw_html = _text(read_events(tmp_path / "adamw"), "config")
    sgd_text, _ = _text(read_events(tmp_path / "sgd"), "config")
    assert "<pre><code>" in adamw_html  # one code block
    assert "    lr: 0.001235" in adamw_text.splitlines()
    assert "momentum" not in adamw_text and "warmup_epochs" not in adamw_text
    assert "    momentum: 0.8765" in sgd_text.splitlines() and "warmup_epochs: 1" in sgd_text
    assert "freeze_backbone_epochs" not in sgd_text  # random weights: always 0
    numbers = re.findall(r"\d[\d.]*", adamw_text + sgd_text)
    assert max(len(n.replace(".", "").lstrip("0")) for n in numbers) == 4  # 0.001235


class FakeTrial(SimpleNamespace):
    """What TrialTensorBoard reads of a Ray Trial."""

    def __init__(self, root, trial_id: str, lr: float):
        super().__init__(trial_id=trial_id, local_path=str(root / f"trial_{trial_id}"),
                         config={"lr": lr, "batch_size": 64}, status="RUNNING", last_result={})


def test_every_session_of_a_search_ends_with_how_its_trial_ended(tmp_path):
    """The callback driven as Ray's TuneController drives it: the trials ASHA stops and those
    that end by themselves go through on_trial_complete, a failed one through on_trial_error;
    the time budget marks the running ones TERMINATED and calls nothing but on_step_end."""
    (tmp_path / "space.yaml").write_text(SPACE)
    space = load_space(tmp_path / "space.yaml")
    options = SearchOptions(data="unused", base_config=BASE)
    callback = TrialTensorBoard(space, options, trial_data())
    trials = [FakeTrial(tmp_path, name, lr) for name, lr in
              [("completed", 1e-3), ("stopped", 2e-3), ("failed", 3e-3), ("cut", 4e-3)]]
    completed, stopped, failed, cut = trials
    for trial in trials:
        callback.on_trial_start(0, trials, trial)
        callback.on_trial_result(0, trials, trial, {"epoch": 1, "best_val_auc": 0.75})
        trial.last_result = {"epoch": 1}
    completed.last_result = {"epoch": 1, "final_epoch": True}
    stopped.last_result = {"epoch": 1, "final_epoch": False}
    callback.on_trial_complete(1, trials, completed)
    callback.on_trial_complete(1, trials, stopped)
    callback.on_trial_error(1, trials, failed)
    for trial in trials:
        trial.status = "TERMINATED"
    callback.on_step_end(2, trials)
    callback.on_experiment_end(trials)
    ended = {}
    for trial in trials:
        events = read_events(trial.local_path)
        assert events.Scalars(SCALARS["best_val_auc"])[-1].value == 0.75
        ended[trial.trial_id] = hparams_data(
            events, metadata.SESSION_END_INFO_TAG).session_end_info.status
    assert ended == {"completed": api_pb2.STATUS_SUCCESS, "stopped": api_pb2.STATUS_UNKNOWN,
                     "failed": api_pb2.STATUS_FAILURE, "cut": api_pb2.STATUS_RUNNING}


def test_a_resumed_search_continues_its_sessions_and_declares_nothing_twice(tmp_path):
    """Ctrl-C leaves the running trials' sessions open for `--resume`, which logs on into the
    same runs and ends them, and finds the search's declaration."""
    run, options, space = search_folder(tmp_path, SPACE)
    data = trial_data()
    first = TrialTensorBoard(space, options, data)
    trial = FakeTrial(run, "t", 1e-3)
    first.on_trial_start(0, [trial], trial)
    first.on_trial_result(0, [trial], trial, {"epoch": 1, "best_val_auc": 0.6})
    first.on_experiment_end([trial])  # interrupted: the session stays open
    assert metadata.SESSION_END_INFO_TAG not in read_events(trial.local_path).Tags()["tensors"]

    declare_search_once(str(run), space.spec)  # the resumed search's start
    resumed = TrialTensorBoard(space, options, data)
    resumed.on_trial_start(0, [trial], trial)
    resumed.on_trial_result(0, [trial], trial, {"epoch": 2, "best_val_auc": 0.8})
    trial.last_result = {"epoch": 2, "final_epoch": True}
    resumed.on_trial_complete(1, [trial], trial)
    assert [p.name for p in run.glob("*tfevents*")] == [EXPERIMENT_EVENTS]
    assert hparams_data(read_events(run), metadata.EXPERIMENT_TAG).experiment.hparam_infos
    events = read_events(trial.local_path)
    assert [e.step for e in events.Scalars(SCALARS["best_val_auc"])] == [1, 2]
    # The resumed trial opens its session again; TensorBoard reads a tag's first metadata only.
    start = hparams_data(events, metadata.SESSION_START_INFO_TAG).session_start_info
    assert start.hparams["lr"].number_value == 1e-3
    end = hparams_data(events, metadata.SESSION_END_INFO_TAG).session_end_info
    assert end.status == api_pb2.STATUS_SUCCESS


def test_tensorboard_is_started_on_a_free_port(tmp_path):
    line = start_tensorboard(str(tmp_path))
    assert line.startswith("TensorBoard at http://localhost:"), line
    url, pid = line.split()[2], int(line.split("kill ")[1].rstrip(")"))
    # Opens unsmoothed, on the trials' runs: the Time Series tab's own query parameters.
    assert url.endswith("/?smoothing=0&runFilter=%5Etrial_#timeseries")
    try:
        with urllib.request.urlopen(url, timeout=10) as page:
            assert page.status == 200
    finally:
        os.kill(pid, signal.SIGTERM)
