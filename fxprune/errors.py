"""Every mistake a user can make ends in a subclass of FxpruneError whose message says what to do."""

from __future__ import annotations


class FxpruneError(Exception):
    """Base class of every error fxprune raises on purpose."""


class FxpruneTraceError(FxpruneError):
    """The model could not be traced by torch.fx."""


class CaptureError(FxpruneTraceError):
    """No capture path (torch.fx, torch.export non-strict or strict) could capture the model whole."""


class ExampleInputsError(FxpruneError):
    """The example inputs do not fit the model (wrong type, count, shape or dtype)."""


class OutputError(FxpruneError):
    """compile was asked for a kind of result it does not make (``output=``)."""


class KeepError(FxpruneError):
    """``keep=`` names no module of the model that makes channels."""


class PlanError(FxpruneError):
    """A keep plan is invalid for the analysed graph (unknown group, empty group, frozen group...)."""


class AnalysisRequiredError(FxpruneError):
    """A pass ran on a GraphModule that lacks the results of the passes it depends on."""


class ExportError(FxpruneError):
    """ONNX export, checking or onnxruntime verification failed."""


class BudgetError(FxpruneError):
    """A budget is malformed (<= 0, > 1, wrong type) or cannot be met by any plan; in the second case
    ``smallest`` is the smallest cost a plan reaches (in the budget's metric) and ``smallest_share`` that
    cost as a share of the unpruned model's, where it is known; ``advice`` what to do, in a few words."""

    def __init__(self, message: str, smallest: float | None = None, smallest_share: float | None = None,
                 advice: str = "raise the budget") -> None:
        super().__init__(message)
        self.smallest, self.smallest_share, self.advice = smallest, smallest_share, advice


class EngineUnavailableError(FxpruneError):
    """The latency engine asked for cannot run on this machine (no GPU, package not installed...)."""


class LatencyError(FxpruneError):
    """A latency table or whole-model timing could not be measured."""


class UnsupportedModelError(FxpruneError):
    """The model is of a kind fxprune does not prune (integer or quantized weights, no parameters...)."""


class InvalidWeightsError(FxpruneError):
    """The model's weights can't be used: NaN or infinite values, or a checkpoint that does not fit the model."""


class ScoreError(FxpruneError):
    """An importance criterion was misnamed, or lacks the data it needs."""


class SolverError(FxpruneError):
    """A solver setting is invalid: an unknown solver name, a ``resolution`` or ``round_to`` that is not a
    positive integer."""


class SaveError(FxpruneError):
    """A model could not be saved or loaded (unknown suffix, not an fxprune file, export failed...)."""


class PrunerError(FxpruneError):
    """The training-time pruner was set up or stepped in a way it cannot work with."""


class HealError(FxpruneError):
    """fxprune.heal was called with settings it cannot train with."""


class SSRError(FxpruneError):
    """SSR was set up with values it cannot work with."""


class ModelNotFoundError(FxpruneError):
    """The command line's MODEL names no torchvision or timm model, no importable factory, no model file."""
