import urllib.error

import pytest
import torch
from torchvision import models

import ctmodels.resnet as resnet
from ctmodels import ARCHS, WeightsError, build_model


@pytest.mark.parametrize("arch", sorted(ARCHS))
@pytest.mark.parametrize("head", [[], [64], [128, 32]])
def test_every_arch_takes_one_channel_and_gives_one_logit(arch, head):
    model = build_model(arch, head, dropout=0.1).eval()
    assert model.conv1.in_channels == 1
    hidden = [m.out_features for m in model.fc if isinstance(m, torch.nn.Linear)]
    assert hidden == [*head, 1]
    with torch.no_grad():
        assert model(torch.zeros(2, 1, 32, 32)).shape == (2, 1)


def test_unknown_arch_and_activation():
    with pytest.raises(ValueError, match="unknown arch 'vgg16'"):
        build_model("vgg16")
    with pytest.raises(ValueError, match="unknown activation"):
        build_model(activation="tanhh")


def _rgb_state() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    return models.resnet18().state_dict()  # what torchvision's weight file holds


def test_rgb_state_dict_file_is_summed_into_one_channel(tmp_path):
    rgb = _rgb_state()
    torch.save(rgb, tmp_path / "resnet18.pth")
    model = build_model("resnet18", [32], weights=str(tmp_path / "resnet18.pth"))
    torch.testing.assert_close(model.conv1.weight, rgb["conv1.weight"].sum(1, keepdim=True))
    torch.testing.assert_close(model.layer4[1].conv2.weight, rgb["layer4.1.conv2.weight"])
    # A gray image repeated in 3 channels through the RGB conv equals 1 channel through ours.
    gray = torch.rand(1, 1, 16, 16)
    rgb_conv = torch.nn.functional.conv2d(gray.repeat(1, 3, 1, 1), rgb["conv1.weight"])
    torch.testing.assert_close(torch.nn.functional.conv2d(gray, model.conv1.weight), rgb_conv)


def test_imagenet_download_failure_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))

    def offline(*args, **kwargs):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(models._api, "load_state_dict_from_url", offline)
    with pytest.raises(WeightsError) as err:
        build_model("resnet18", weights="imagenet")
    message = str(err.value)
    assert "could not get ImageNet weights for resnet18" in message
    assert str(tmp_path / "hub" / "checkpoints" / "resnet18-f37072fd.pth") in message
    assert "weights=PATH" in message and "\n" not in message


def test_imagenet_weights_from_a_pre_seeded_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    rgb = _rgb_state()
    cache = tmp_path / "hub" / "checkpoints"
    cache.mkdir(parents=True)
    torch.save(rgb, cache / "resnet18-f37072fd.pth")
    monkeypatch.setattr(resnet.torch.hub, "download_url_to_file",
                        lambda *a, **k: pytest.fail("tried to download despite the cache"))
    model = build_model("resnet18", weights="imagenet")
    torch.testing.assert_close(model.conv1.weight, rgb["conv1.weight"].sum(1, keepdim=True))
    torch.testing.assert_close(model.bn1.running_var, rgb["bn1.running_var"])


def test_own_state_dict_round_trip_and_mismatches_named(tmp_path):
    model = build_model("resnet18", [16]).eval()
    torch.save(model.state_dict(), tmp_path / "ours.pt")
    again = build_model("resnet18", [16], weights=str(tmp_path / "ours.pt")).eval()
    x = torch.rand(2, 1, 32, 32)
    torch.testing.assert_close(again(x), model(x))

    with pytest.raises(WeightsError, match=r"fc.1.weight \(16, 512\) vs \(8, 512\)"):
        build_model("resnet18", [8], weights=str(tmp_path / "ours.pt"))
    state = model.state_dict()
    state["extra.weight"] = torch.zeros(1)
    del state["layer4.1.bn2.bias"]
    torch.save(state, tmp_path / "odd.pt")
    with pytest.raises(WeightsError, match=r"missing keys: \['layer4.1.bn2.bias'\].*extra.weight"):
        build_model("resnet18", [16], weights=str(tmp_path / "odd.pt"))


def test_pickled_module_and_missing_file_are_refused(tmp_path):
    torch.save(build_model("resnet18"), tmp_path / "module.pt")  # a whole pickled nn.Module
    with pytest.raises(WeightsError, match="not a loadable state_dict"):
        build_model("resnet18", weights=str(tmp_path / "module.pt"))
    with pytest.raises(WeightsError, match="weights file not found"):
        build_model("resnet18", weights=str(tmp_path / "nope.pt"))
