"""Training-time pruning on the user's model: HALP's schedule (``Pruner``) and SSR's regularizer (``SSR``);
the healing fine-tune of a pruned language model (``heal``)."""

from fxprune.training.heal import heal
from fxprune.training.pruner import Pruner
from fxprune.training.ssr import SSR

__all__ = ["Pruner", "SSR", "heal"]
