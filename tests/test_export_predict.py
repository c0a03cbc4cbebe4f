"""Export round trips, prediction on files, and Grad-CAM heatmaps, on tiny random resnet18s."""

from __future__ import annotations

import copy
import csv
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from helpers import REPO, tree_snapshot
from PIL import Image
from test_volumes import level_slice, write_ct

from ctmodels import (
    NORM_MEAN,
    NORM_STD,
    Ensemble,
    build_model,
    load_model,
    normalize,
    predict_proba,
)
from ctscan.cli import main
from data_utils.decode import decode_image
from data_utils.errors import UserError
from results.explain import explain_paths, gradcam
from results.export import export_model
from results.model_folder import ModelFolderError, load_exported
from results.predict import predict_paths
from tuning.config import TrainConfig

CLASSES = ("non-COVID", "COVID")


def _export(root: Path, size: int) -> tuple[Path, torch.nn.Module]:
    torch.manual_seed(0)
    config = TrainConfig(arch="resnet18", head=[8], image_size=size)
    model = build_model(config.arch, config.head, config.dropout, config.activation).eval()
    extra = {
        "searched": {"lr": 0.001, "head": [8]},
        "test_metrics": {"auc": {"value": np.float64(0.9), "ci95": [0.8, 0.97]}},
        "data": {"path": "/data/ct", "images": 4, "split_sha256": "ab" * 32,
                 "source": "sarscov2-ct-scan",
                 "group_by": "duplicates", "split_counts": {"test": {"COVID": 2}},
                 "skipped": [{"path": "x.png", "reason": "empty file"}]},
        "trial_id": "trial_0001",
    }
    return export_model(root / "model", [(model, config)], CLASSES, 0.5, extra), model


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> tuple[Path, torch.nn.Module]:
    return _export(tmp_path_factory.mktemp("export32"), 32)


@pytest.fixture(scope="module")
def exported64(tmp_path_factory) -> tuple[Path, torch.nn.Module]:
    # 64 px: layer4 is 2 x 2, so a Grad-CAM map has some structure (at 32 px it is one pixel)
    return _export(tmp_path_factory.mktemp("export64"), 64)


def _images(folder: Path, n: int = 3, seed: int = 0) -> list[Path]:
    """Small PNGs in modes L and RGB, one non-square (exercises padding)."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(n):
        shape = (40, 56) if i == 2 else (48, 48)
        pixels = rng.integers(0, 256, shape, dtype=np.uint8)
        img = Image.fromarray(pixels).convert("RGB" if i % 2 else "L")
        paths.append(folder / f"slice{i}.png")
        img.save(paths[-1])
    return paths


def test_export_round_trip(exported):
    model_dir, model = exported
    x = normalize(torch.randint(0, 256, (3, 32, 32), dtype=torch.uint8), NORM_MEAN, NORM_STD)
    loaded, _, config = load_exported(model_dir)
    assert not loaded.training
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x), rtol=0, atol=0)
    saved = torch.load(model_dir / "model.pt", weights_only=True)
    [member] = saved["members"]
    assert member["description"]["arch"] == "resnet18" and saved["temperature"] == 1.0
    assert member["model"].keys() == model.state_dict().keys()


def test_an_ensemble_exports_as_one_model_in_every_format(tmp_path):
    """Two members of different heads, weighted 3:1, each calibrated by its own temperature:
    model.pt, TorchScript and ONNX all give the logit of the members' weighted mean calibrated
    probability, divided by the temperature."""
    from results.model_folder import onnx_predictor

    torch.manual_seed(1)
    configs = [TrainConfig(head=[8], image_size=32), TrainConfig(head=[], image_size=32)]
    nets = [c.description().build().eval() for c in configs]
    model_dir = export_model(tmp_path / "m", list(zip(nets, configs, strict=True)), CLASSES,
                             0.4, {}, [{"trial_id": "a"}, {"trial_id": "b"}], temperature=2.0,
                             weights=[0.75, 0.25], member_temperatures=[1.5, 0.8])
    images = torch.randint(0, 256, (3, 32, 32), dtype=torch.uint8)
    with torch.no_grad():
        x = normalize(images, NORM_MEAN, NORM_STD)
        probs = torch.stack([torch.sigmoid(n(x).squeeze(1) / t)
                             for n, t in zip(nets, (1.5, 0.8), strict=True)])
    expected = torch.sigmoid(torch.logit(0.75 * probs[0] + 0.25 * probs[1]) / 2.0)
    loaded, description = load_model(model_dir / "model.pt")
    assert isinstance(loaded, Ensemble) and description.image_size == 32
    torch.testing.assert_close(predict_proba(loaded, images, description), expected, rtol=0,
                               atol=1e-6)
    script = torch.jit.load(model_dir / "model.torchscript.pt")
    torch.testing.assert_close(torch.sigmoid(script(images)), expected, rtol=0, atol=1e-6)
    assert np.abs(onnx_predictor(model_dir)(images.numpy()) - expected.numpy()).max() < 1e-4
    config = json.loads((model_dir / "config.json").read_text())
    assert [(m["trial_id"], m["weight"], m["temperature"]) for m in config["members"]] == [
        ("a", 0.75, 1.5), ("b", 0.25, 0.8)]
    card = (model_dir / "model_card.md").read_text()
    assert "ensemble of 2" in card and "temperature of 2" in card
    assert "(trial a, weight 0.75)" in card and "(trial b, weight 0.25)" in card


def test_torchscript_runs_with_plain_torch(exported, tmp_path):
    model_dir, model = exported
    images = torch.randint(0, 256, (4, 32, 32), dtype=torch.uint8)
    torch.save(images, tmp_path / "in.pt")
    script = textwrap.dedent(f"""
        import sys, torch
        model = torch.jit.load({str(model_dir / "model.torchscript.pt")!r})
        images = torch.load({str(tmp_path / "in.pt")!r}, weights_only=True)
        with torch.no_grad():
            torch.save(model(images), {str(tmp_path / "out.pt")!r})
        assert not any(m.split(".")[0] in ("ctmodels", "data_utils", "tuning", "results")
                       for m in sys.modules), "ctscan code was imported"
    """)
    # -I: isolated mode, so neither the cwd nor PYTHONPATH can put the repo on sys.path
    done = subprocess.run([sys.executable, "-I", "-W", "ignore", "-c", script],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    logits = torch.load(tmp_path / "out.pt", weights_only=True)
    with torch.no_grad():
        expected = model(normalize(images, NORM_MEAN, NORM_STD)).squeeze(1)
    assert logits.shape == (4,)
    torch.testing.assert_close(logits, expected, rtol=1e-5, atol=1e-5)


def test_config_and_model_card(exported):
    model_dir, _ = exported
    config = json.loads((model_dir / "config.json").read_text())
    assert yaml.safe_load((model_dir / "config.yaml").read_text()) == config
    for key in ("members", "image_size", "resize", "normalization", "threshold", "class_names",
                "positive_class", "versions", "searched", "test_metrics", "data", "trial_id"):
        assert key in config, key
    [member] = config["members"]
    assert member["arch"] == "resnet18" and member["head"] == [8] and config["image_size"] == 32
    assert member["train_config"]["lr"] == 1e-3
    assert config["class_names"] == list(CLASSES) and config["positive_class"] == "COVID"
    assert set(config["normalization"]) >= {"mean", "std", "scale"}
    assert config["test_metrics"]["auc"]["value"] == 0.9  # numpy scalar became a plain float
    assert set(config["versions"]) == {"python", "torch", "torchvision", "numpy", "onnxruntime",
                                       "ctscan"}
    model, description = load_model(model_dir / "model.pt")  # the one loader, weights_only
    assert description.arch == "resnet18" and description.head == (8,)
    card = (model_dir / "model_card.md").read_text()
    for phrase in ("not a medical device", "Not for diagnosis", "São Paulo", "Slice-level",
                   "optimistic", "torch.jit.load", "[0.8, 0.97]", "- path: ct",
                   "    - COVID: 2", "skipped: 1"):
        assert phrase in card, phrase
    assert "/data/ct" not in card  # the data folder by its name only


def test_text_files_are_utf8_whatever_the_locale(exported, tmp_path):
    """In an ASCII locale the model card's "São Paulo" once failed to write: every text file
    ctscan writes goes through atomic_write, which writes UTF-8 whatever the locale."""
    model_dir, _ = exported
    card = (model_dir / "model_card.md").read_text(encoding="utf-8")
    assert "São Paulo" in card
    script = textwrap.dedent(f"""
        import locale
        from pathlib import Path
        from data_utils.files import atomic_write
        assert locale.getpreferredencoding(False) != "UTF-8"
        with atomic_write(Path({str(tmp_path / "card.md")!r}), "w") as f:
            f.write(Path({str(model_dir / "model_card.md")!r}).read_text(encoding="utf-8"))
    """)
    env = {**os.environ, "LC_ALL": "C", "LANG": "C", "PYTHONCOERCECLOCALE": "0",
           "PYTHONUTF8": "0"}
    done = subprocess.run([sys.executable, "-c", script], env=env, cwd=REPO,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "card.md").read_bytes() == card.encode("utf-8")


def test_export_refuses_clashing_extra_and_missing_folder(tmp_path):
    model = build_model("resnet18")
    with pytest.raises(ValueError, match="threshold"):
        export_model(tmp_path / "m", [(model, TrainConfig())], CLASSES, 0.5, {"threshold": 0.3})
    with pytest.raises(ModelFolderError, match="nowhere: no such model folder"):
        load_exported(tmp_path / "nowhere")


def test_predict_matches_direct_model_path(exported, tmp_path):
    model_dir, model = exported
    paths = _images(tmp_path / "in")
    pixels = np.stack([decode_image(p.read_bytes(), 32, "pad").pixels for p in paths])
    expected = predict_proba(model, torch.from_numpy(pixels), load_exported(model_dir)[1]).tolist()
    rows = predict_paths(model_dir, [tmp_path / "in"], batch_size=2, progress=False)
    assert [r["path"] for r in rows] == [str(p) for p in paths]  # folder expanded, sorted
    assert [r["prob"] for r in rows] == pytest.approx(expected, rel=1e-6)
    for r in rows:
        assert r["error"] is None
        assert r["label"] == ("COVID" if r["prob"] >= 0.5 else "non-COVID")


def test_onnx_file_gives_the_same_probabilities_as_torch(exported, tmp_path):
    from results.model_folder import onnx_predictor

    model_dir, model = exported
    pixels = np.random.default_rng(1).integers(0, 256, (5, 32, 32), dtype=np.uint8)
    expected = predict_proba(model, torch.from_numpy(pixels), load_exported(model_dir)[1]).numpy()
    assert np.abs(onnx_predictor(model_dir)(pixels) - expected).max() < 1e-4
    assert np.abs(onnx_predictor(model_dir)(pixels[:1]) - expected[:1]).max() < 1e-4  # any batch


def test_predict_runs_the_onnx_file_where_torch_is_absent(exported, tmp_path):
    """A machine with onnxruntime but no torch: `import torch` fails in the child process."""
    model_dir, model = exported
    paths = _images(tmp_path / "in")
    pixels = np.stack([decode_image(p.read_bytes(), 32, "pad").pixels for p in paths])
    expected = predict_proba(model, torch.from_numpy(pixels), load_exported(model_dir)[1]).tolist()
    code = ("import sys\n"
            "sys.modules['torch'] = None\n"
            "from ctscan.cli import main\n"
            f"code = main(['predict', {str(model_dir)!r}, {str(tmp_path / 'in')!r}])\n"
            "assert 'torch' not in [m.split('.')[0] for m in sys.modules if sys.modules[m]]\n"
            "sys.exit(code)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    got = [float(line.split("\t")[1]) for line in out.stdout.splitlines()]
    assert got == pytest.approx(expected, abs=1e-4)


def test_corrupt_file_gets_error_row_and_exit_code(exported, tmp_path, capsys):
    model_dir, _ = exported
    good = _images(tmp_path / "in")
    bad = tmp_path / "in" / "broken.png"
    bad.write_bytes(b"not a png at all")
    (tmp_path / "empty").mkdir()
    rows = predict_paths(model_dir, [*good, bad, tmp_path / "empty"], progress=False)
    assert [r["error"] is None for r in rows] == [True, True, True, False, False]
    assert rows[3]["prob"] is None and rows[3]["label"] is None
    assert rows[3]["error"].startswith("UnidentifiedImageError")
    assert "no image files" in rows[4]["error"]

    csv_path = tmp_path / "out" / "pred.csv"
    assert main(["predict", str(model_dir), *map(str, [*good, bad]), "--csv", str(csv_path)]) == 1
    assert "ERROR" in capsys.readouterr().out
    with csv_path.open(newline="") as f:
        table = list(csv.DictReader(f))
    assert list(table[0]) == ["path", "prob_COVID", "label", "error", "slices"]
    assert len(table) == 4 and table[3]["error"] and not table[3]["prob_COVID"]
    assert float(table[0]["prob_COVID"]) == rows[0]["prob"]
    assert main(["predict", str(model_dir), *map(str, good)]) == 0


def test_a_malformed_dicom_among_good_inputs_gets_its_error_row_and_the_rest_carry_on(
        exported, tmp_path):
    model_dir, _ = exported
    good = _images(tmp_path / "in")
    series = tmp_path / "in" / "series"
    for k in range(3):
        write_ct(series / f"{k}.dcm", level_slice(-1250.0 + 300 * k),
                 ImagePositionPatient=[0.0, 0.0, 2.5 * k])
    write_ct(series / "bad.dcm", level_slice(-500.0), ImagePositionPatient=[0.0, 1.0])
    rows = predict_paths(model_dir, [*good, series], progress=False)
    assert [r["path"] for r in rows[:3]] == [str(p) for p in good]
    assert all(r["error"] is None and r["prob"] is not None for r in rows[:3])
    series_row, bad_row = rows[3:]
    assert series_row["error"] is None and series_row["slices"] == 3
    assert series_row["prob"] is not None
    assert bad_row["error"] == "malformed ImagePositionPatient: expected 3 numbers, got 2"
    assert bad_row["prob"] is None and bad_row["label"] is None
    # Grad-CAM of the same batch: the three images and the series' slice, the bad file counted.
    written, failed = explain_paths(model_dir, [*good, series], tmp_path / "cams")
    assert len(written) == 4 and failed == 1


def test_gradcam_shape_range_and_input_dependence(exported64):
    model = copy.deepcopy(exported64[1])
    # A random net's logit gradients point down almost everywhere, so ReLU leaves all-zero maps;
    # flipping the output layer turns the same evidence positive.
    model.fc[-1].weight.data.neg_()
    x = normalize(torch.randint(0, 256, (3, 64, 64), dtype=torch.uint8,
                                generator=torch.Generator().manual_seed(1)), NORM_MEAN, NORM_STD)
    maps = gradcam(model, x)
    assert maps.shape == (3, 64, 64) and maps.dtype == np.float32
    assert maps.min() >= 0 and maps.max() <= 1
    assert not np.allclose(maps[0], maps[1])
    assert not model.training
    assert all(p.grad is None for p in model.parameters())
    # hooks are gone: a second call captures only its own activations
    assert not model.layer4._forward_hooks
    np.testing.assert_allclose(gradcam(model, x[:1]), maps[:1], atol=1e-5)


def test_explain_exits_1_when_an_image_is_skipped_as_predict_does(exported64, tmp_path):
    model_dir, _ = exported64
    good = _images(tmp_path / "in", n=2)
    bad = tmp_path / "in" / "broken.png"
    bad.write_bytes(b"\x89PNG broken")
    assert main(["explain", str(model_dir), *map(str, good), "--out", str(tmp_path / "a")]) == 0
    assert main(["explain", str(model_dir), *map(str, [*good, bad]), "--out",
                 str(tmp_path / "b")]) == 1
    assert len(list((tmp_path / "b").glob("*.png"))) == 2
    assert main(["predict", str(model_dir), *map(str, [*good, bad])]) == 1


def test_explain_writes_pngs_only_into_out_dir(exported64, tmp_path, capsys):
    model_dir, _ = exported64
    inputs = tmp_path / "in"
    _images(inputs)
    (inputs / "broken.png").write_bytes(b"\x89PNG broken")
    before = tree_snapshot(inputs)
    written, failed = explain_paths(model_dir, [inputs], tmp_path / "cams")
    assert failed == 1  # broken.png
    assert tree_snapshot(inputs) == before
    assert [p.name for p in written] == [f"slice{i}_gradcam.png" for i in range(3)]
    for p in written:
        assert p.parent == tmp_path / "cams" and p.stat().st_size > 0
        with Image.open(p) as img:
            assert img.width > 64 and img.height > 64
    assert "skipped" in capsys.readouterr().err
    with pytest.raises(UserError, match="inside the data folder"):
        explain_paths(model_dir, [inputs], inputs / "cams")


def test_an_overlay_title_keeps_the_whole_name_as_text(tmp_path):
    """A "#" that is not a slice number, a "$" (matplotlib's formula sign) and dots stay in the
    name; a volume's FILE#K is its slice K."""
    from results.explain import _write_overlays

    image, cam = np.zeros((32, 32), np.uint8), np.zeros((32, 32))
    config = {"class_names": ["non-COVID", "COVID"], "threshold": 0.5}
    names = ["COVID/[x](y) #1 $\\q$ 5.v2.png", "p001.nii.gz#12"]
    written = _write_overlays([(name, image, cam, 0.7) for name in names], config, tmp_path)
    assert [p.name for p in written] == ["[x](y) #1 $\\q$ 5.v2_gradcam.png", "p001_gradcam.png"]
