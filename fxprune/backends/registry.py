"""Engines by name: what ``engine="onnxruntime"`` and friends resolve to."""

from __future__ import annotations

from typing import Callable

from fxprune.backends.engines import CudaEngine, Engine, TorchEngine
from fxprune.backends.ort import OnnxRuntimeEngine, OnnxRuntimeInt8Engine
from fxprune.errors import FxpruneError

ENGINES: dict[str, Callable[[int | None], Engine]] = {"onnxruntime": OnnxRuntimeEngine,
                                                      "onnxruntime-int8": OnnxRuntimeInt8Engine,
                                                      "torch": TorchEngine, "cuda": CudaEngine}


def get_engine(engine: str | Engine, threads: int | None = None, check: bool = True) -> Engine:
    """An Engine instance from a name in ENGINES (or an instance, returned as is); with ``check``,
    EngineUnavailableError where it cannot run here."""
    if isinstance(engine, Engine):
        instance = engine
    elif engine in ENGINES:
        instance = ENGINES[engine](threads)
    else:
        raise FxpruneError(f"unknown engine {engine!r}; choose one of {', '.join(ENGINES)} or pass an "
                           "fxprune.backends.engines.Engine instance")
    if check:
        instance.check_available()
    return instance
