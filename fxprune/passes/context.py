"""What the passes of one compile share, made once: the example inputs (as the captured graph takes them),
the engine (calibrated on the user's batches where it quantizes), the latency cache, each graph's digest,
the analysed model deployed on the engine, and the pruned copies already built."""

from __future__ import annotations

from contextlib import ExitStack
from typing import Any, Callable, Iterable, cast

import torch
import torch.fx

from fxprune.backends.engines import Deployed, Engine
from fxprune.backends.registry import get_engine
from fxprune.cache import LatencyCache
from fxprune.errors import LatencyError
from fxprune.ir.channels import Plan
from fxprune.ir.graph import model_digest
from fxprune.passes.rewrite import RewritePass

NO_ENGINE = object()  # a Context for passes that time nothing


class Context:
    """Shared state of one pipeline run; use it in a ``with`` block so deployed models are released."""

    def __init__(self, example_inputs: Any, engine: Any = NO_ENGINE, *, threads: int | None = None,
                 cache: LatencyCache | str | None = None, progress: bool = True, check: bool = True,
                 remeasure: bool = False, calibration: Iterable[Any] = ()) -> None:
        self.example_inputs = tuple(example_inputs) if isinstance(example_inputs, (tuple, list)) else (example_inputs,)
        self.engine = None if engine is NO_ENGINE else calibrated(get_engine(engine, threads, check=check),
                                                                  list(calibration))
        self.cache = cache if isinstance(cache, LatencyCache) else LatencyCache(*(() if cache is None else (cache,)))
        self.cache.remeasure = self.cache.remeasure or remeasure
        self.progress = progress
        self._stack = ExitStack()
        self._memo: dict[tuple, tuple[torch.nn.Module, Any]] = {}  # the module is kept alive with its id

    def _once(self, what: str, gm: torch.nn.Module, extra: str, make: Callable[[], Any]) -> Any:
        key = (what, id(gm), extra)
        if key not in self._memo:
            self._memo[key] = gm, make()
        return self._memo[key][1]

    def digest(self, gm: torch.fx.GraphModule) -> str:
        """``ir.graph.model_digest`` of ``gm`` at these inputs (what cached timings of it are keyed by)."""
        return self._once("digest", gm, "", lambda: model_digest(gm, self.example_inputs))

    def timing_engine(self) -> Engine:
        """The engine, for what deploys or times a model (LatencyError for a Context made without one)."""
        if self.engine is None:
            raise LatencyError("deploying a model needs an engine: make the Context with engine='onnxruntime' "
                               "(or 'torch', 'cuda', an Engine)")
        return self.engine

    def deployed(self, gm: torch.fx.GraphModule) -> Deployed:
        """The analysed model deployed on the engine, for as long as this context is open."""
        engine = self.timing_engine()
        return self._once("deployed", gm, "", lambda: self._stack.enter_context(
            engine.deploy_traced(gm, self.example_inputs, self.cache, self.digest(gm))))

    def deploy(self, module: torch.nn.Module, example_inputs: tuple) -> Deployed:
        """Any module deployed on the engine as it runs (a model captured in parts, whole), once per context."""
        engine = self.timing_engine()
        return self._once("deploy", module, "", lambda: self._stack.enter_context(
            engine.deploy(module, example_inputs)))

    def pruned(self, gm: torch.fx.GraphModule, plan: Plan) -> torch.fx.GraphModule:
        """``gm`` pruned to ``plan`` (the rewrite pass's result), built once per plan: the reduced copy the
        latency pass times, each plan the closed loop times, and the plan the pipeline's rewrite returns."""
        return self._once("pruned", gm, plan.to_json(), lambda: _rewritten(gm, plan))

    def close(self) -> None:
        """Release every model deployed and forget the copies built (the context can be used again)."""
        self._stack.close()
        self._memo.clear()

    def __enter__(self) -> "Context":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _rewritten(gm: torch.fx.GraphModule, plan: Plan) -> torch.fx.GraphModule:
    result = RewritePass(plan)(gm)
    assert result is not None  # the rewrite pass returns its PassResult
    return cast(torch.fx.GraphModule, result.graph_module)


def calibrated(engine: Engine, batches: list) -> Engine:
    """``engine``, calibrating the models it quantizes on ``batches`` too (a copy: the user's engine stays as it
    was); an engine that quantizes nothing, or no batches, as it is. A batch of (inputs, labels) gives its inputs."""
    calibrate = getattr(engine, "calibrated", None)  # the engines that quantize (onnxruntime-int8)
    if not batches or calibrate is None:
        return engine
    return calibrate([batch[0] if isinstance(batch, (tuple, list)) and len(batch) == 2 else batch
                      for batch in batches])
