"""Training-time pruning on the user's model: HALP's schedule (``Pruner``) and SSR's regularizer (``SSR``)."""

from fxprune.training.pruner import Pruner
from fxprune.training.ssr import SSR

__all__ = ["Pruner", "SSR"]
