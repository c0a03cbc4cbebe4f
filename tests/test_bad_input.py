"""Bad input, as a hostile or hurried user gives it, to every command.

Each case must end with exit 2 and one line `ctscan...: error: ...` naming the path or key, no
traceback, the data folder byte-identical, and nothing written where the command would write.
"""

from __future__ import annotations

import urllib.error
from dataclasses import asdict
from pathlib import Path

import pytest
import torch
from helpers import make_class_folders, tree_snapshot
from torchvision import models

from ctmodels import build_model
from ctscan.cli import main
from data_utils.files import write_json
from results.export import export_model
from tuning.config import make_config
from tuning.records import SearchOptions
from tuning.space import DEMO_SPACE


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    """A real exported model (untrained), for predict and explain."""
    out = tmp_path_factory.mktemp("model")
    return export_model(out, [(build_model("resnet18"), make_config({"image_size": 32}))],
                        ("non-COVID", "COVID"), 0.5, {})


def _files(w: Path) -> None:
    """The broken inputs the cases point at, all outside the data folder."""
    (w / "afile").write_text("")
    (w / "latin1.csv").write_bytes(b"path,label\nCOVID/caf\xe9.png,COVID\n")
    (w / "header.csv").write_text("file,class\na.png,COVID\n")
    (w / "escape.csv").write_text("path,label\n../../etc/passwd,COVID\nb.png,non-COVID\n")
    (w / "nolabel.csv").write_text("path,label\ndata/COVID/COVID (0).png,\n")
    (w / "dup.csv").write_text("path,label\ndata/COVID/COVID (0).png,COVID\n"
                               "data/COVID/COVID (1).png,COVID\n./data/COVID/COVID (1).png,COVID\n"
                               "data/non-COVID/non-COVID (0).png,non-COVID\n")
    (w / "bad.yaml").write_text("lr: [1\n")
    (w / "list.yaml").write_text("- lr\n")
    (w / "latin1.yaml").write_bytes(b"arch: r\xe9snet\n")
    (w / "space_dist.yaml").write_text("lr: {loguniform: [1, -3]}\n")
    (w / "space_key.yaml").write_text("bogus: {choice: [1, 2]}\n")
    (w / "space_range.yaml").write_text("batch_size: {choice: [1, 32]}\n")
    (w / "space_fixed.yaml").write_text("arch: resnet18\nlr: 0.001\n")
    (w / "twice.yaml").write_text("lr: 0.001\nbatch_size: 16\nlr: 0.01\n")
    (w / "space_twice.yaml").write_text("lr: {loguniform: [1.0e-4, 1.0e-2]}\n"
                                        "dropout: {uniform: [0, 0.5]}\ndropout: 0.1\n")
    (w / "garbage.pt").write_bytes(b"garbage")
    (w / "notsearch").mkdir()
    (w / "cut").mkdir()
    (w / "cut" / "search.json").write_text('{"data": "/d", "num_sa')
    (w / "alien").mkdir()
    (w / "alien" / "search.json").write_text('{"colour": "red"}')
    (w / "runs" / "taken").mkdir(parents=True)
    (w / "runs" / "taken" / "search.json").write_text("{}")
    (w / "runs" / "taken" / "tuner.pkl").write_bytes(b"")  # Ray Tune's state: it started
    bad = w / "badmodel"
    bad.mkdir()
    (bad / "config.json").write_text("{")
    (bad / "model.pt").write_bytes(b"garbage")


def _offline(monkeypatch, w: Path) -> None:
    monkeypatch.setenv("TORCH_HOME", str(w / "torch"))

    def no_network(*args, **kwargs):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(models._api, "load_state_dict_from_url", no_network)


def _run_of_the_data(w: Path) -> None:
    """A run folder whose search.json names the data folder, and nothing else."""
    (w / "fakerun").mkdir()
    write_json(w / "fakerun" / "search.json", asdict(SearchOptions(data=str(w / "data"))))


def _class_folder_linked_elsewhere(w: Path) -> None:
    make_class_folders(w / "elsewhere", 3, classes=("COVID",))
    make_class_folders(w / "linked", 3, classes=("non-COVID",))
    (w / "linked" / "COVID").symlink_to(w / "elsewhere" / "COVID")


def _no_driver() -> None:
    """What torch says on a machine without an NVIDIA driver (seen on this one), whatever machine
    the test runs on."""
    raise RuntimeError("Found no NVIDIA driver on your system. Please check that you have an "
                       "NVIDIA GPU and installed a driver from\nhttp://www.nvidia.com/Download")


def _split_with_seed_5(monkeypatch, w: Path) -> None:
    assert main(["split", str(w / "data"), "--out", str(w / "run"), "--split-seed", "5",
                 "--image-size", "32"]) == 0


def _model_copy_with_broken_weights(model_dir: Path, w: Path) -> None:
    bad = w / "badweights"
    bad.mkdir()
    (bad / "config.json").write_text((model_dir / "config.json").read_text())
    described = {"description": {"arch": "resnet18"}, "model": {"conv1.weight": torch.zeros(1)}}
    torch.save({"members": [described]}, bad / "model.pt")


# id: (command, what its error line must contain, setup). {W} is the work folder, {D} the data
# folder (class folders COVID/ and non-COVID/, 6 slices each), {M} an exported model,
# {I} an image, {S} the demo search space.
CASES = {
    # inspect: where the data is and what it holds
    "data_missing": ("inspect {W}/missing",
                     "{W}/missing: no such file or folder", None),
    "data_is_an_image": ("inspect {I}",
                         "{I}: expected a folder of class folders or a .csv", None),
    "manifest_not_utf8": ("inspect {W}/latin1.csv",
                          "{W}/latin1.csv: not UTF-8", None),
    "manifest_header": ("inspect {W}/header.csv",
                        "{W}/header.csv: header must be path,label", None),
    "manifest_escapes": ("inspect {W}/escape.csv",
                         "{W}/escape.csv:2: path '../../etc/passwd' escapes", None),
    "manifest_empty_label": ("inspect {W}/nolabel.csv",
                             "{W}/nolabel.csv:2: empty path or label", None),
    "manifest_duplicate_rows": ("inspect {W}/dup.csv",
                                "{W}/dup.csv:3 and :4 both list data/COVID/COVID (1).png", None),
    "one_class": ("inspect {W}/one",
                  "{W}/one: found only class 'COVID'", "one_class"),
    "three_classes": ("inspect {W}/three",
                      "{W}/three: found 3 classes", "three_classes"),
    "empty_class_folder": ("inspect {W}/emptyclass",
                           "{W}/emptyclass/non-COVID: class folder holds no image "
                           "files", "empty_class"),
    "unknown_positive_class": ("inspect {D} --positive-class flu",
                               "--positive-class 'flu' is not one of", None),
    "unguessable_positive_class": ("inspect {W}/ab",
                                   "cannot tell which of ['a', 'b'] is the positive "
                                   "class; pass --positive-class", "ab_classes"),
    "class_name_negates_the_hint": ("inspect {W}/negated",
                                     "('covid_negative' also says no/not/negative); pass "
                                     "--positive-class", "negated_classes"),
    "cache_inside_data": ("inspect {D} --cache-dir {D}/.cache",
                          "--cache-dir {D}/.cache lies inside the data folder", None),
    "class_unreadable": ("inspect {W}/unreadable --image-size 32",
                         "class 'COVID' has no readable images", "unreadable_class"),
    "same_bytes_two_labels": ("inspect {W}/twolabels --image-size 32",
                              "byte-identical but labelled", "two_labels"),
    "image_size_zero": ("inspect {D} --image-size 0",
                        "--image-size: expected an integer in [32, 2048], got '0'", None),
    # split: where it writes and what it can make
    "split_out_under_a_file": ("split {D} --out {W}/afile/run --image-size 32",
                               "{W}/afile", None),
    "split_out_through_a_linked_class_folder": (
        "split {W}/linked --out {W}/elsewhere/COVID/run --image-size 32",
        "--out {W}/elsewhere/COVID/run lies inside the data folder {W}/elsewhere/COVID",
        "linked_class"),
    "split_out_inside_data": ("split {D} --out {D}/run",
                              "--out {D}/run lies inside the data folder", None),
    "split_ratios_sum": ("split {D} --out {W}/run --ratios 0.5 0.2 0.1",
                         "summing to 1", None),
    "split_too_few_groups": ("split {D} --out {W}/run --image-size 32",
                             "too few independent groups", "two_per_class"),
    "split_seed_negative": ("split {D} --out {W}/run --split-seed -1",
                            "--split-seed: expected an integer", None),
    # train: config file, overrides, weights, run folder
    "config_missing": ("train {D} --out {W}/run --config {W}/nope.yaml",
                       "{W}/nope.yaml: cannot read config", None),
    "config_bad_yaml": ("train {D} --out {W}/run --config {W}/bad.yaml",
                        "{W}/bad.yaml: not valid YAML at line 2", None),
    "config_not_a_mapping": ("train {D} --out {W}/run --config {W}/list.yaml",
                             "{W}/list.yaml: expected a mapping", None),
    "config_not_utf8": ("train {D} --out {W}/run --config {W}/latin1.yaml",
                        "{W}/latin1.yaml: not UTF-8", None),
    "config_duplicate_key": ("train {D} --out {W}/run --config {W}/twice.yaml",
                             "{W}/twice.yaml: not valid YAML at line 3, column 1: duplicate key "
                             "'lr' (also on line 1)", None),
    "set_without_equals": ("train {D} --out {W}/run --set lr",
                           "--set expects key=value, got 'lr'", None),
    "set_unknown_key": ("train {D} --out {W}/run --set colour=red",
                        "unknown config key 'colour'", None),
    "set_bad_yaml": ("train {D} --out {W}/run --set head=[1",
                     "--set head=[1: not valid YAML", None),
    "set_unsafe_yaml_tag": ("train {D} --out {W}/run --set lr=!!python/name:os.system",
                            "--set lr=!!python/name:os.system: not valid YAML", None),
    "set_batch_size_1": ("train {D} --out {W}/run --set batch_size=1",
                         "batch_size must be in [2, inf), got 1", None),
    "set_unknown_arch": ("train {D} --out {W}/run --set arch=vgg16",
                         "arch must be one of", None),
    "weights_missing": ("train {D} --out {W}/run --set weights={W}/w.pt",
                        "{W}/w.pt: weights file not found", None),
    "weights_corrupt": ("train {D} --out {W}/run --set weights={W}/garbage.pt",
                        "{W}/garbage.pt: not a loadable state_dict", None),
    "weights_imagenet_offline": ("train {D} --out {W}/run --set weights=imagenet",
                                 "could not get ImageNet weights for resnet18", "offline"),
    "train_on_cuda_without_a_driver": ("train {D} --out {W}/run --set device=cuda",
                                       "device cuda: CUDA is not usable here (RuntimeError: "
                                       "Found no NVIDIA driver", "no_cuda"),
    "train_out_inside_data": ("train {D} --out {D}/run",
                              "--out {D}/run lies inside the data folder", None),
    "train_onto_another_split": ("train {D} --out {W}/run --set image_size=32",
                                 "{W}/run was trained on another split of the "
                                 "data (seed 5 -> 0", "split_seed_5"),
    "train_without_data": ("train --out {W}/run",
                           "train needs DATA", None),
    # tune: search space, storage, resume
    "space_missing": ("tune {D} --search-space {W}/nope.yaml --storage-path {W}/runs",
                      "{W}/nope.yaml: no such search space file", None),
    "space_bad_distribution": ("tune {D} --search-space {W}/space_dist.yaml --storage-path "
                               "{W}/runs",
                               "{W}/space_dist.yaml: lr: loguniform low 1 > high -3", None),
    "space_unknown_key": ("tune {D} --search-space {W}/space_key.yaml --storage-path {W}/runs",
                          "{W}/space_key.yaml: unknown config key 'bogus'", None),
    "space_value_out_of_range": ("tune {D} --search-space {W}/space_range.yaml --storage-path "
                                 "{W}/runs",
                                 "{W}/space_range.yaml: batch_size: batch_size must be in "
                                 "[2, inf)", None),
    "space_searches_nothing": ("tune {D} --search-space {W}/space_fixed.yaml --storage-path "
                               "{W}/runs",
                               "{W}/space_fixed.yaml: searches nothing, every key is fixed", None),
    "space_duplicate_key": ("tune {D} --search-space {W}/space_twice.yaml --storage-path "
                            "{W}/runs",
                            "{W}/space_twice.yaml: not valid YAML at line 3, column 1: duplicate "
                            "key 'dropout' (also on line 2)", None),
    "bootstrap_too_few": ("tune {D} --bootstrap 10",
                          "argument --bootstrap: expected an integer in [200, inf), got '10' "
                          "(see ctscan tune --help)", None),
    "unknown_command": ("frobnicate",
                        "invalid choice: 'frobnicate'", None),
    "storage_inside_data": ("tune {D} --search-space {S} --storage-path {D}/runs",
                            "--storage-path {D}/runs lies inside the data folder", None),
    "run_name_climbs_out": ("tune {D} --search-space {S} --storage-path {W}/runs --name ../data/x",
                            "--name '../data/x' must be a single folder name", None),
    "run_name_absolute": ("tune {D} --search-space {S} --storage-path {W}/runs --name {D}/x",
                          "--name '{D}/x' must be a single folder name", None),
    "resume_name_climbs_out": ("tune --resume --name .. --storage-path {W}/runs",
                               "--name '..' must be a single folder name", None),
    "run_name_taken": ("tune {D} --search-space {S} --storage-path {W}/runs --name taken",
                       "{W}/runs/taken already holds a search; continue it with --resume", None),
    "resume_not_a_search": ("tune --resume {W}/notsearch",
                            "{W}/notsearch: not a ctscan search", None),
    "resume_search_json_cut_short": ("tune --resume {W}/cut",
                                     "{W}/cut/search.json: not valid JSON (line 1", None),
    "resume_search_json_alien": ("tune --resume {W}/alien",
                                 "{W}/alien/search.json: not a ctscan search file", None),
    "run_uri_unknown_scheme": ("evaluate foo://bucket/runs/x",
                               "foo://bucket/runs/x/search.json: not a folder or a storage URI",
                               None),
    "tune_weights_missing": ("tune {D} --search-space {S} --storage-path {W}/runs --weights "
                             "{W}/w.pt", "{W}/w.pt: weights file not found", None),
    "resume_without_name": ("tune --resume",
                            "--resume needs --name NAME", None),
    "tune_zero_trials": ("tune {D} --num-samples 0",
                         "--num-samples: expected an integer in [1, inf), got '0'", None),
    # evaluate, export: run folders
    "evaluate_not_a_search": ("evaluate {W}/notsearch",
                              "{W}/notsearch: not a ctscan search (no search.json)", None),
    "evaluate_cache_inside_data": ("evaluate {W}/fakerun --cache-dir {D}/.cache",
                                   "--cache-dir {D}/.cache lies inside the data folder", "run"),
    "evaluate_cache_variable_inside_data": ("evaluate {W}/fakerun",
                                            "CTSCAN_CACHE_DIR {D}/.cache lies inside the data "
                                            "folder", "run_and_cache_variable"),
    "evaluate_best_json_of_another_shape": ("evaluate {W}/fakerun",
                                            "{W}/fakerun/best.json: not a ctscan run file (no key "
                                            "'checkpoint')", "run_with_odd_files"),
    "export_metrics_json_of_another_shape": ("export {W}/fakerun --out {W}/exported",
                                             "{W}/fakerun/results/metrics.json: not a ctscan run "
                                             "file (expected a JSON object)", "run_with_odd_files"),
    "export_out_inside_data": ("export {W}/fakerun --out {D}/exported",
                               "--out {D}/exported lies inside the data folder", "run"),
    "evaluate_threshold_nan": ("evaluate {W}/notsearch --threshold nan",
                               "--threshold: expected a number in [0, 1], got 'nan'", None),
    "export_not_evaluated": ("export {W}/fakerun --out {W}/export",
                             "{W}/fakerun/results/metrics.json: not found; run `ctscan "
                             "evaluate", "run"),
    # predict, explain: model folders and outputs
    "predict_model_missing": ("predict {W}/nomodel {I}",
                              "{W}/nomodel: no such model folder", None),
    "predict_model_not_json": ("predict {W}/badmodel {I}",
                               "{W}/badmodel/config.json: not a ctscan model config", None),
    "predict_weights_wrong": ("predict {W}/badweights {I}",
                              "{W}/badweights/model.pt: weights do not fit resnet18",
                              "broken_weights"),
    "predict_csv_is_a_folder": ("predict {M} {I} --csv {W}",
                                "--csv {W} is a folder", None),
    "predict_csv_onto_an_input": ("predict {M} {I} --csv {I}",
                                  "--csv {I} is one of the command's input files", None),
    "predict_csv_inside_data": ("predict {M} {D} --csv {D}/p.csv",
                                "--csv {D}/p.csv lies inside the data folder", None),
    "explain_out_inside_data": ("explain {M} {D} --out {D}/cams",
                                "--out {D}/cams lies inside the data folder", None),
    "explain_out_next_to_input": ("explain {M} {I} --out {D}/COVID",
                                  "--out {D}/COVID holds input", None),
    # make-demo-data: never over a folder with files
    "demo_data_over_data": ("make-demo-data {D}",
                            "refusing to overwrite non-empty directory", None),
    "demo_data_tiny": ("make-demo-data {W}/demo --size 8",
                       "--size: expected an integer in [32, 4096], got '8'", None),
}

SETUPS = {
    "one_class": lambda w, m, mp: make_class_folders(w / "one", 2, classes=("COVID",)),
    "three_classes": lambda w, m, mp: make_class_folders(w / "three", 2,
                                                          classes=("COVID", "flu", "normal")),
    "empty_class": lambda w, m, mp: (make_class_folders(w / "emptyclass", 2, classes=("COVID",)),
                                     (w / "emptyclass" / "non-COVID").mkdir()),
    "negated_classes": lambda w, m, mp: make_class_folders(w / "negated", 2,
                                                           classes=("covid_negative", "normal")),
    "ab_classes": lambda w, m, mp: make_class_folders(w / "ab", 2, classes=("a", "b")),
    "unreadable_class": lambda w, m, mp: (
        make_class_folders(w / "unreadable", 2, classes=("non-COVID",)),
        (w / "unreadable" / "COVID").mkdir(),
        (w / "unreadable" / "COVID" / "x.png").write_bytes(b"\x89PNG broken")),
    "two_labels": lambda w, m, mp: (
        make_class_folders(w / "twolabels", 3),
        (w / "twolabels" / "COVID" / "copy.png").write_bytes(
            (w / "twolabels" / "non-COVID" / "non-COVID (0).png").read_bytes())),
    "offline": lambda w, m, mp: _offline(mp, w),
    "split_seed_5": lambda w, m, mp: _split_with_seed_5(mp, w),
    "broken_weights": lambda w, m, mp: _model_copy_with_broken_weights(m, w),
    "run": lambda w, m, mp: _run_of_the_data(w),
    "run_with_odd_files": lambda w, m, mp: (
        _run_of_the_data(w), write_json(w / "fakerun" / "best.json", {"trial_id": "a"}),
        write_json(w / "fakerun" / "results" / "metrics.json", ["not", "an", "object"])),
    "run_and_cache_variable": lambda w, m, mp: (
        _run_of_the_data(w), mp.setenv("CTSCAN_CACHE_DIR", str(w / "data" / ".cache"))),
    "linked_class": lambda w, m, mp: _class_folder_linked_elsewhere(w),
    # Two images (groups) of a class cannot fill three splits; three can.
    "two_per_class": lambda w, m, mp: [p.unlink() for p in (w / "data").glob("*/*")
                                       if not p.name.endswith(("(0).png", "(1).png"))],
    "no_cuda": lambda w, m, mp: mp.setattr(torch.cuda, "init", _no_driver),
}


@pytest.mark.parametrize("case", CASES)
def test_bad_input_is_one_line_exit_2_and_writes_nothing(case, tmp_path, model_dir, monkeypatch,
                                                         capsys):
    command, expected, setup = CASES[case]
    w = tmp_path
    data = make_class_folders(w / "data", 6)
    _files(w)
    if setup:
        SETUPS[setup](w, model_dir, monkeypatch)
    names = {"W": str(w), "D": str(data), "M": str(model_dir), "S": str(DEMO_SPACE),
             "I": str(data / "COVID" / "COVID (0).png")}

    argv = [word.format(**names) for word in command.split()]  # {I} holds spaces
    expected = expected.format(**names)
    run_existed = (w / "run").exists()
    before = tree_snapshot(data)
    capsys.readouterr()
    try:
        code = main(argv)
    except SystemExit as e:  # argparse's refusals of an option's value
        code = e.code
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip() and not line.startswith("\r")]
    assert code == 2, err
    assert "Traceback" not in err
    last = lines[-1]
    assert last.startswith("ctscan: error: "), err  # argparse's refusals too: one format
    assert "usage:" not in err
    assert expected in last, last
    assert [line for line in lines if ": error: " in line] == [last]
    assert tree_snapshot(data) == before
    if not run_existed:
        assert not (w / "run").exists()
