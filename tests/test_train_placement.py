"""Where the dataset lives: on the training device when it fits the budget, else on the host."""

import pytest
import torch

from ctmodels import NORM_MEAN, NORM_STD
from data_utils.augment import train_batches
from data_utils.cache import load_dataset
from data_utils.demo import make_demo_data
from data_utils.split import split_dataset
from tuning.config import make_config
from tuning.train import (
    DEVICE_DATA_FRACTION,
    fits_on_device,
    load_checkpoint,
    rows_to_device,
    train_trial,
    trial_data,
)

TINY = {"image_size": 32, "batch_size": 16, "epochs": 2, "aug_strength": 0.5, "seed": 1,
        "num_workers": 2}
GIB = 2**30


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    root = make_demo_data(tmp_path_factory.mktemp("demo") / "data", n_per_class=30, size=64)
    ds = load_dataset(root, 32, cache_dir=tmp_path_factory.mktemp("cache"), progress=False)
    return trial_data(ds, split_dataset(ds, (0.6, 0.2, 0.2), seed=0, group_by="none"))


def test_the_budget_is_a_fraction_of_the_trials_share_of_gpu_memory():
    budget = int(DEVICE_DATA_FRACTION * 0.25 * 80 * GIB)  # a quarter of an 80 GiB GPU
    assert fits_on_device(budget, 80 * GIB, 0.25)
    assert not fits_on_device(budget + 1, 80 * GIB, 0.25)
    assert fits_on_device(budget + 1, 80 * GIB, 0.5)  # a bigger share takes it


def test_host_batches_equal_device_batches():
    images = torch.randint(0, 256, (21, 24, 24), dtype=torch.uint8)
    labels = torch.arange(21)
    there = list(train_batches(images, labels, 4, 1.0, NORM_MEAN, NORM_STD,
                               torch.Generator().manual_seed(3)))
    copied = list(train_batches(images, labels, 4, 1.0, NORM_MEAN, NORM_STD,
                                torch.Generator().manual_seed(3), device=torch.device("cpu")))
    assert len(there) == len(copied) == 5  # 4 + 4 + 4 + 4 + 5: the last image joins a batch
    for (x, y), (hx, hy) in zip(there, copied, strict=True):
        assert torch.equal(x, hx) and torch.equal(y, hy)


@pytest.mark.parametrize("host", [False, True])
def test_batches_gathered_by_row_equal_batches_of_the_rows_copied(host):
    """A trial reads its rows out of the whole cache (train_batches' rows): the same batches as
    from a copy of just those rows, gathered where the images are or on the host."""
    cache = torch.randint(0, 256, (40, 24, 24), dtype=torch.uint8)
    rows = torch.tensor([31, 2, 17, 5, 8, 39, 23, 11, 0, 14, 26])
    labels = torch.arange(len(rows)) % 2
    device = torch.device("cpu") if host else None
    by_row = list(train_batches(cache, labels, 4, 1.0, NORM_MEAN, NORM_STD,
                                torch.Generator().manual_seed(5), device=device, rows=rows))
    copied = list(train_batches(cache[rows], labels, 4, 1.0, NORM_MEAN, NORM_STD,
                                torch.Generator().manual_seed(5), device=device))
    assert len(by_row) == len(copied) == 3
    for (x, y), (cx, cy) in zip(by_row, copied, strict=True):
        assert torch.equal(x, cx) and torch.equal(y, cy)
    assert torch.equal(rows_to_device(cache, rows, torch.device("cpu"), chunk=3), cache[rows])


@pytest.mark.parametrize("ema", [False, True])
def test_training_from_the_host_gives_identical_results(demo, tmp_path, ema):
    config = make_config({**TINY, "ema": ema})
    on_device = train_trial(config, demo, tmp_path / "device", data_on_device=True)
    on_host = train_trial(config, demo, tmp_path / "host", data_on_device=False)
    runs = [load_checkpoint(tmp_path / run / "last.pt") for run in ("device", "host")]
    keys = ("epoch", "train_loss", "val_loss", "val_auc", "val_accuracy", "val_f1", "lr")
    histories = [[{k: m[k] for k in keys} for m in run["history"]] for run in runs]
    assert len(histories[0]) == 2
    assert histories[0] == histories[1]
    assert on_device["val_auc"] == on_host["val_auc"]
    for part in ("model", *(("trained_model",) if ema else ())):
        first, second = runs[0][part], runs[1][part]
        assert first.keys() == second.keys()
        assert all(torch.equal(first[name], second[name]) for name in first), part
