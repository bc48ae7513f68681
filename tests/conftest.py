"""Test options: the default run covers one model per torchvision family; --all-models covers all."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from fxprune.testing import FAMILY_REPRESENTATIVES, SEGMENTATION_MODELS, classification_models


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--all-models", action="store_true",
                     help="run the zoo tests on all 80 torchvision classification models and every "
                          "segmentation model instead of one model per family, and compile them with every "
                          "data-free importance criterion (slow: hours on 2 cores)")


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "zoo_model" in metafunc.fixturenames:
        if metafunc.config.getoption("--all-models"):
            names = classification_models() + list(SEGMENTATION_MODELS)
        else:
            names = list(FAMILY_REPRESENTATIVES)
        metafunc.parametrize("zoo_model", names)
    if "zoo_criterion" in metafunc.fixturenames:
        all_models = metafunc.config.getoption("--all-models")
        metafunc.parametrize("zoo_criterion", ["sp_lamp", "lamp", "l1", "l2", "bn_scale"] if all_models
                             else ["sp_lamp"])


@pytest.fixture(autouse=True, scope="session")
def _latency_cache_outside_home(tmp_path_factory: pytest.TempPathFactory):
    """Tests never write the user's latency cache (~/.cache/fxprune)."""
    import os

    previous = os.environ.get("FXPRUNE_CACHE_DIR")
    os.environ["FXPRUNE_CACHE_DIR"] = str(tmp_path_factory.mktemp("fxprune-cache"))
    yield
    if previous is None:
        os.environ.pop("FXPRUNE_CACHE_DIR", None)
    else:
        os.environ["FXPRUNE_CACHE_DIR"] = previous


class ResidualBlock(nn.Module):
    """``relu(x + bn(conv(relu(bn(conv(x))))))``: a torchvision BasicBlock without downsample; ``scale``
    multiplies its branch's last BatchNorm (1e-3: a branch that adds almost nothing)."""

    def __init__(self, width: int = 32, inner: int = 64, scale: float = 1.0) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(width, inner, 3, padding=1, bias=False), nn.BatchNorm2d(inner)
        self.conv2, self.bn2 = nn.Conv2d(inner, width, 3, padding=1, bias=False), nn.BatchNorm2d(width)
        with torch.no_grad():
            self.bn2.weight.mul_(scale)

    def forward(self, x):
        return torch.relu(x + self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x))))))


class ResidualNet(nn.Module):
    """A stem, one residual block per entry of ``scales``, a classifier: what depth tests remove blocks of."""

    def __init__(self, scales: tuple[float, ...] = (1.0, 1.0, 1.0)) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU())
        self.blocks = nn.Sequential(*[ResidualBlock(scale=s) for s in scales])
        self.head = nn.Linear(32, 10)

    def forward(self, x):
        return self.head(self.blocks(self.stem(x)).mean((2, 3)))


@pytest.fixture
def residual_net() -> type[ResidualNet]:
    """The class of a small residual network (``ResidualNet(scales)``), one block per scale."""
    return ResidualNet
