"""Networks: torchvision ResNets adapted to 1-channel CT slices with a binary head."""

from ctmodels.resnet import ARCHS, WeightsError, build_model, load_weights_file

__all__ = ["ARCHS", "WeightsError", "build_model", "load_weights_file"]
