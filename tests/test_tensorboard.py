"""What TensorBoard shows, read back with TensorBoard's own loading code.

A search's runs are checked on tests/test_search.py's search (`test_tensorboard_*` there), which
runs anyway; these tests need no search.
"""

import os
import signal
import urllib.request

import numpy as np
import torch
from helpers import hparams_data, read_events
from matplotlib.figure import Figure
from PIL import Image
from tensorboard.plugins.hparams import api_pb2, metadata
from torch.utils.tensorboard import SummaryWriter

from tuning.config import make_config
from tuning.monitor import (
    SCALARS,
    declare_search,
    end_session,
    log_report,
    start_session,
    start_tensorboard,
    tensorboard_reporter,
)
from tuning.space import load_space

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


def test_a_search_declares_every_searched_key_with_its_domain(tmp_path):
    (tmp_path / "space.yaml").write_text(SPACE)
    declare_search(tmp_path, load_space(tmp_path / "space.yaml").spec)
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
    assert [m.name.tag for m in experiment.metric_infos][0] == "best_val_auc"


def test_a_session_holds_the_trials_values_and_how_it_ended(tmp_path):
    writer = SummaryWriter(str(tmp_path))
    start_session(writer, {"batch_size": 32, "head": [16], "lr": 0.01, "arch": "resnet18"},
                  ["batch_size", "head", "lr", "momentum"])
    end_session(writer, api_pb2.STATUS_UNKNOWN)
    events = read_events(tmp_path)
    values = hparams_data(events, metadata.SESSION_START_INFO_TAG).session_start_info.hparams
    assert {k: v.WhichOneof("kind") for k, v in values.items()} == {
        "batch_size": "string_value", "head": "string_value", "lr": "number_value"}
    assert (values["batch_size"].string_value, values["head"].string_value) == ("32", "[16]")
    end = hparams_data(events, metadata.SESSION_END_INFO_TAG).session_end_info
    assert end.status == api_pb2.STATUS_UNKNOWN


def test_train_logs_only_the_scalars_a_trial_logs(tmp_path):
    images = torch.randint(0, 256, (8, 32, 32), dtype=torch.uint8)
    report = tensorboard_reporter(tmp_path, make_config({"image_size": 32}), images,
                                  torch.arange(8) % 2)
    report({"epoch": 1, **dict.fromkeys(SCALARS, 0.5), "final_epoch": False}, [], [])
    tags = read_events(tmp_path).Tags()
    assert sorted(tags["scalars"]) == sorted(SCALARS) and len(SCALARS) <= 12
    assert tags["images"] == ["training_inputs_augmented"]


def test_the_report_run_has_figures_gradcams_and_the_report_text(tmp_path):
    overlay = tmp_path / "slice_gradcam.png"
    Image.fromarray(np.zeros((20, 30, 3), np.uint8)).save(overlay)
    fig = Figure()
    fig.add_subplot().plot([0, 1])
    log_report(tmp_path / "run", {"roc": fig}, [overlay], "# Report\n")
    events = read_events(tmp_path / "run")
    assert sorted(events.Tags()["images"]) == ["gradcam/slice_gradcam", "results/roc"]
    assert events.Images("gradcam/slice_gradcam")[0].width == 30
    assert events.Tags()["tensors"] == ["report/text_summary"]


def test_tensorboard_is_started_on_a_free_port(tmp_path):
    line = start_tensorboard(str(tmp_path))
    assert line.startswith("TensorBoard at http://localhost:"), line
    url, pid = line.split()[2], int(line.split("kill ")[1].rstrip(")"))
    try:
        with urllib.request.urlopen(url, timeout=10) as page:
            assert page.status == 200
    finally:
        os.kill(pid, signal.SIGTERM)
