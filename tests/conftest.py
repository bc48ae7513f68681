"""Test options: the default run covers one model per torchvision family; --all-models covers all."""

from __future__ import annotations

import pytest

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
