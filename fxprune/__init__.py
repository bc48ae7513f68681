"""fxprune: latency-aware structured channel pruning for PyTorch, as passes over one torch.fx graph."""

from fxprune.api import (
    analysis,
    analyze,
    blocks,
    capture_of,
    compile,
    graph_inputs,
    groups,
    importance,
    plan_of,
    prune,
    random_plan,
    report,
)
from fxprune.backends.engines import Engine
from fxprune.backends.export import export_onnx
from fxprune.budgets import FLOPs, Latency, Params
from fxprune.cache import LatencyCache
from fxprune.errors import (
    AnalysisRequiredError,
    BudgetError,
    CaptureError,
    EngineUnavailableError,
    ExampleInputsError,
    ExportError,
    FxpruneError,
    FxpruneTraceError,
    HealError,
    InvalidWeightsError,
    LatencyError,
    ModelNotFoundError,
    PlanError,
    PrunerError,
    SaveError,
    ScoreError,
    SolverError,
    SSRError,
    UnsupportedModelError,
)
from fxprune.ir import (
    ChannelGroup,
    ChannelSpace,
    GroupMember,
    LatencyTable,
    NodeChannels,
    Plan,
)
from fxprune.passes.cost import count_flops, count_params
from fxprune.saving import load, save
from fxprune.training import SSR, Pruner, heal

__all__ = [
    "analysis", "analyze", "blocks", "capture_of", "compile", "graph_inputs", "groups", "importance", "plan_of",
    "prune", "random_plan", "report",
    "count_flops", "count_params", "export_onnx", "heal", "load", "save",
    "FLOPs", "Latency", "Params", "Engine", "LatencyCache", "Pruner", "SSR",
    "AnalysisRequiredError", "BudgetError", "CaptureError", "EngineUnavailableError", "ExampleInputsError",
    "ExportError", "FxpruneError", "FxpruneTraceError", "HealError", "InvalidWeightsError", "LatencyError",
    "ModelNotFoundError", "PlanError", "PrunerError", "SaveError", "ScoreError", "SolverError", "SSRError",
    "UnsupportedModelError",
    "ChannelGroup", "ChannelSpace", "GroupMember", "LatencyTable", "NodeChannels", "Plan",
]
