"""Networks: torchvision ResNets adapted to 1-channel CT slices with a binary head, how they are
described, fed and loaded."""

from ctmodels.model import (
    NORM_MEAN,
    NORM_STD,
    PRECISIONS,
    Ensemble,
    ModelDescription,
    UInt8Classifier,
    check_weights,
    load_model,
    normalize,
    predict_proba,
    resolve_precision,
)
from ctmodels.resnet import ARCHS, WeightsError, build_model, load_weights_file

__all__ = ["ARCHS", "NORM_MEAN", "NORM_STD", "PRECISIONS", "Ensemble", "ModelDescription",
           "UInt8Classifier", "WeightsError", "build_model", "check_weights", "load_model",
           "load_weights_file", "normalize", "predict_proba", "resolve_precision"]
