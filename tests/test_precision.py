"""The precision setting: what auto picks where, fp32 logits under bf16 autocast, and the setting
reaching a run from the config, the CLI and (refused) a search space."""

import math
from pathlib import Path

import pytest
import torch
from helpers import make_class_folders, tiny_trial_data
from torch import nn

import ctmodels.model as model_module
import tuning.monitor as monitor_module
import tuning.train as train_module
from ctmodels import ModelDescription, build_model, predict_proba, resolve_precision
from ctscan import cli
from tuning.config import PRECISIONS, ConfigError, load_config, make_config
from tuning.space import load_space
from tuning.train import load_checkpoint, train_trial

CPU, CUDA = torch.device("cpu"), torch.device("cuda")


def test_explicit_precisions_are_kept_and_others_refused():
    assert PRECISIONS == model_module.PRECISIONS
    for device in (CPU, CUDA):
        assert resolve_precision("fp32", device) == "fp32"
        assert resolve_precision("bf16", device) == "bf16"  # emulated where not native: slow
    with pytest.raises(ValueError, match="precision must be one of"):
        resolve_precision("fp16", CPU)
    with pytest.raises(ConfigError, match="precision must be one of"):
        make_config({"precision": "half"})


@pytest.mark.parametrize("native, expected", [(True, "bf16"), (False, "fp32")])
def test_auto_is_bf16_on_cuda_and_on_cpus_with_bf16_instructions(monkeypatch, native, expected):
    monkeypatch.setattr(model_module, "cpu_has_native_bf16", lambda: native)
    assert resolve_precision("auto", CPU) == expected
    assert resolve_precision("auto", "cpu") == expected
    assert resolve_precision("auto", CUDA) == "bf16"
    assert resolve_precision("auto", torch.device("meta")) == "fp32"


@pytest.mark.skipif(not Path("/proc/cpuinfo").is_file(), reason="needs Linux /proc/cpuinfo")
def test_the_cpuinfo_fallback_agrees_with_torchs_own_check(monkeypatch):
    by_torch = model_module.cpu_has_native_bf16.__wrapped__()
    monkeypatch.delattr(torch.cpu, "_is_avx512_bf16_supported", raising=False)
    assert model_module.cpu_has_native_bf16.__wrapped__() == by_torch


def _bf16_forward_check(model: nn.Module) -> list[torch.dtype]:
    """Records the dtype the backbone's last block gives, to show autocast really ran."""
    seen = []
    model.layer4.register_forward_hook(lambda m, i, out: seen.append(out.dtype))
    return seen


@pytest.mark.parametrize("head", [[], [16]])
def test_logits_are_fp32_under_bf16_autocast(head):
    torch.manual_seed(0)
    model = build_model("resnet18", head).eval()
    backbone_dtypes = _bf16_forward_check(model)
    x = torch.randn(64, 1, 32, 32)
    with torch.no_grad(), model_module.autocast(CPU, "bf16"):
        logits = model(x)
    assert backbone_dtypes == [torch.bfloat16]
    assert logits.dtype == torch.float32
    # Not bf16 numbers cast up: bf16 keeps 8 bits, so 64 logits near 0 would share values.
    assert not torch.equal(logits, logits.bfloat16().float())
    assert len(torch.unique(torch.sigmoid(logits))) == 64
    with torch.no_grad():
        reference = model(x)
    torch.testing.assert_close(logits, reference, rtol=0, atol=0.05)


def test_the_fp32_head_keeps_the_state_dict_keys_of_a_plain_sequential():
    model = build_model("resnet18", [8], dropout=0.1)
    assert [k for k in model.state_dict() if k.startswith("fc.")] == [
        "fc.1.weight", "fc.1.bias", "fc.4.weight", "fc.4.bias"]
    old_style = build_model("resnet18", [8])
    old_style.fc = nn.Sequential(*old_style.fc)  # how ctscan built the head before
    model.load_state_dict(old_style.state_dict())


def test_predict_proba_gives_fp32_probabilities_at_either_precision():
    torch.manual_seed(0)
    model = build_model("resnet18")
    images = torch.randint(0, 256, (40, 32, 32), dtype=torch.uint8)
    description = ModelDescription(image_size=32)
    fp32 = predict_proba(model, images, description)
    bf16 = predict_proba(model, images, description, "bf16", batch_size=16)
    assert model.conv1.weight.is_contiguous(memory_format=torch.channels_last)
    assert fp32.dtype == bf16.dtype == torch.float32
    assert len(torch.unique(bf16)) == 40
    torch.testing.assert_close(bf16, fp32, rtol=0, atol=0.02)


def test_a_bf16_trial_on_cpu_trains_under_autocast_and_records(tmp_path, monkeypatch):
    _, data = tiny_trial_data(tmp_path)
    used = []
    real = train_module.autocast
    monkeypatch.setattr(train_module, "autocast",
                        lambda device, precision: used.append(precision) or real(device,
                                                                                  precision))
    config = make_config({"image_size": 32, "batch_size": 8, "epochs": 1, "seed": 0,
                          "num_workers": 2, "device": "cpu", "precision": "bf16"})
    reported = []
    best = train_trial(config, data, tmp_path / "run", lambda m, *_: reported.append(m))
    assert used and set(used) == {"bf16"}
    assert len(reported) == 1 and math.isfinite(reported[0]["train_loss"])
    assert 0 <= best["val_auc"] <= 1
    weights = load_checkpoint(tmp_path / "run" / "best.pt")
    assert weights["config"]["precision"] == weights["precision"] == "bf16"

    used.clear()
    train_trial(make_config({**config.to_dict(), "precision": "fp32"}), data, tmp_path / "fp32")
    assert used and set(used) == {"fp32"}


def test_a_search_space_may_not_search_precision(tmp_path):
    (tmp_path / "space.yaml").write_text("precision: {choice: [fp32, bf16]}\n"
                                         "lr: {loguniform: [1.0e-4, 1.0e-2]}\n")
    with pytest.raises(ConfigError, match="precision is a setting of the run, not searched; use "
                                          "`ctscan tune --precision` instead"):
        load_space(tmp_path / "space.yaml")


def test_the_precision_flags(tmp_path, monkeypatch, capsys):
    parser = cli.build_parser()
    args = parser.parse_args(["tune", str(tmp_path), "--demo", "--precision", "fp32"])
    options = cli._search_options(args)
    assert options.base_config["precision"] == "fp32"
    assert make_config(options.base_config).precision == "fp32"
    assert parser.parse_args(["tune", str(tmp_path)]).precision == "auto"
    assert parser.parse_args(["train"]).precision is None  # the config's own value
    with pytest.raises(SystemExit):
        parser.parse_args(["train", "--precision", "fp16"])
    assert "invalid choice: 'fp16'" in capsys.readouterr().err

    trained = []
    monkeypatch.setattr(train_module, "train_trial", lambda config, *a, **k: trained.append(
        config) or {"epoch": 1, "val_auc": 0.5, "val_accuracy": 0.5, "val_f1": 0.5,
                    "val_loss": 0.7})
    monkeypatch.setattr(monitor_module, "tensorboard_reporter", lambda *a: lambda *m: None)
    root = make_class_folders(tmp_path / "data", 6)
    assert cli.main(["train", str(root), "--out", str(tmp_path / "run"), "--group-by", "none",
                     "--set", "image_size=32", "--set", "precision=fp32",
                     "--precision", "bf16"]) == 0
    assert trained[0].precision == "bf16"  # the flag wins over --set
    assert load_config(tmp_path / "run" / "config.yaml").precision == "bf16"
