"""How a model was captured, and the structure of its inputs and outputs.

Every pass works on a graph that takes its inputs as a flat list of tensors and returns a flat tuple
(the leaves of the model's inputs and outputs, as torch.utils._pytree flattens them). ``Capture`` keeps
the structure, so the module fxprune returns is called like the original (positional tuples, keyword
inputs, lists of images) and returns what it returned (a Hugging Face ``ModelOutput``, dicts, nested
tuples). A model torch.fx captures needs none of this: its graph already takes and returns them.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any, TypeGuard, TypeVar

import torch
import torch.fx
from torch.fx.graph import _PyTreeCodeGen, _PyTreeInfo

from fxprune.errors import ExampleInputsError
from fxprune.ir.keys import CAPTURE_KEY

FX, EXPORT, EXPORT_STRICT, PARTITIONED = "fx", "export", "export-strict", "partitioned"
PART_KEY = "part"  # node.meta of a partitioned graph: the part a node belongs to (kept by the rewrite)
M = TypeVar("M", bound=torch.nn.Module)


@dataclass
class Part:
    """A submodule captured alone when the whole model could not be: where it sits in the model
    (``path``), how many times one forward calls it, how it was captured (its own ``capture``: the
    structure it is called with), and the names, in the partitioned graph, of what feeds its inputs
    and of its outputs' leaves (None for a constant leaf, kept in ``constants``)."""

    path: str
    calls: int
    capture: "Capture"
    placeholders: list[str]
    inputs: list[str]
    outputs: list[str | None]
    constants: dict[int, Any] = field(default_factory=dict)
    # called first, or fed only by such parts' outputs: what it returns depends on no post-processing (a
    # detector's backbone and dense heads, not its ROI heads), so it is compared exactly on export
    raw: bool = False

    @property
    def coupled(self) -> list[str]:
        """The inputs fed by another part's output, unchanged (``"path:leaf"``; the rest are placeholders)."""
        return [source for source in self.inputs if ":" in source]


@dataclass
class Capture:
    """``path``: which front end captured the model (``fx``, ``export``, ``export-strict``); ``failed``:
    the paths tried before it, each with the error it ended in; ``structure``: the pytree layout of the
    inputs and outputs when the graph's own are flat (torch.export), else None."""

    path: str
    failed: list[tuple[str, str]] = field(default_factory=list)
    structure: _PyTreeInfo | None = None
    parts: list[Part] = field(default_factory=list)  # PARTITIONED: the submodules captured, in call order

    def describe(self) -> str:
        tried = "; ".join(f"{p} failed: {e.splitlines()[0][:120]}" for p, e in self.failed)
        found = f" as {len(self.parts)} parts ({', '.join(p.path for p in self.parts)})" if self.parts else ""
        return f"captured by {self.path}{found}" + (f" ({tried})" if tried else "")


def split_inputs(example_inputs: Any, example_kwargs: dict | None = None) -> tuple[tuple, dict]:
    """The example call as (positional, keyword): a tensor is one positional input, a tuple or list the
    positional ones, a dict the keyword ones; ``example_kwargs`` adds keyword inputs."""
    args: tuple
    if isinstance(example_inputs, dict):
        args, kwargs = (), dict(example_inputs)
    elif isinstance(example_inputs, (tuple, list)):
        args, kwargs = tuple(example_inputs), {}
    elif example_inputs is None:
        args, kwargs = (), {}
    else:
        args, kwargs = (example_inputs,), {}
    return args, {**kwargs, **(example_kwargs or {})}


def capture_of(gm: torch.nn.Module) -> Capture | None:
    return getattr(gm, "meta", {}).get(CAPTURE_KEY)


def is_partitioned(module: torch.nn.Module) -> bool:
    """Whether ``module`` (a stitched graph, or the model fxprune assembled from it) was captured in parts."""
    capture = capture_of(module)
    return capture is not None and capture.path == PARTITIONED


def is_structured(gm: torch.nn.Module) -> TypeGuard[torch.fx.GraphModule]:
    """Whether ``gm`` takes and returns its inputs' and outputs' structure (not the flat leaves)."""
    return isinstance(gm, torch.fx.GraphModule) and isinstance(gm.graph._codegen, _PyTreeCodeGen)


def flat_inputs(gm: torch.nn.Module, args: tuple, kwargs: dict | None = None) -> tuple:
    """The graph's own inputs for a call made as the model is called: the leaves, in the graph's order."""
    capture = capture_of(gm)
    if is_partitioned(gm):
        raise ExampleInputsError("a graph captured in parts takes its parts' inputs, which only a run of the model "
                                 "gives: use fxprune.passes.pipeline.analyze_inputs(model, inputs), which returns them")
    if capture is None or capture.structure is None:
        return tuple(args)
    # by the captured spec, so keyword inputs given in another order land where the graph reads them
    return tuple(torch.fx._pytree.tree_flatten_spec((tuple(args), dict(kwargs or {})), capture.structure.in_spec))


def structured(gm: M) -> M:
    """``gm`` made to take and return what the model did (in place; a no-op for a graph that already does,
    and for a module that is not a graph: the user's own model, pruned, is called as it always was)."""
    capture = capture_of(gm)
    if (isinstance(gm, torch.fx.GraphModule) and capture is not None and capture.structure is not None
            and not is_structured(gm)):
        gm.graph._codegen = _PyTreeCodeGen(copy.copy(capture.structure))
        gm._in_spec, gm._out_spec = capture.structure.in_spec, capture.structure.out_spec  # the code reads them
        gm.recompile()
    return gm


def flat(gm: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """``gm`` made to take the leaves of its inputs and return a tuple of its outputs' leaves (in place)."""
    if is_structured(gm):
        gm.graph._codegen = torch.fx.graph.CodeGen()
        gm.recompile()
    return gm


def flat_view(gm: torch.nn.Module) -> torch.nn.Module:
    """A module sharing ``gm``'s weights that takes and returns flat leaves (for exporters and engines);
    ``gm`` itself is returned when it already does."""
    if not is_structured(gm):
        return gm
    graph = copy.deepcopy(gm.graph)
    graph._codegen = torch.fx.graph.CodeGen()
    view = torch.fx.GraphModule(gm, graph, type(gm).__name__)
    view.meta = gm.meta
    return view
