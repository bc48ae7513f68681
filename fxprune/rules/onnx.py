"""What a rule knows of the ONNX ops its operation exports to, for resizing an exported graph.

``backends/onnx_resize.py`` walks a full model's ONNX graph with a pruned copy's widths. Each rule
that claims ONNX op types (``Rule.onnx``) says, for those ops, the shape an initializer no parameter
names takes from its role (a bias the exporter made) and how the attributes that record a width (a
convolution's ``group``) follow the inputs' new shapes. The walk raises ``ResizeError`` (then the
caller exports the pruned copy instead) wherever a rule cannot say.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper

Shapes = dict[str, tuple[int, ...]]  # value name -> shape, in the full graph (old) or the resized one (new)


class ResizeError(Exception):
    """The graph holds a width ``resize`` cannot update with certainty; export the pruned copy instead."""


class OnnxOps:
    """ONNX op types whose outputs follow their inputs' shapes, and no attribute of which records a width.

    ``idempotent``: those of the types with f(f(x)) = f(x), of which the exporter writes one where two
    run in a row (removing a block can leave two in a row: one goes, as in the pruned model's export).
    """

    def __init__(self, *types: str, idempotent: tuple[str, ...] = ()) -> None:
        self.types = frozenset(types)
        self.idempotent = frozenset(idempotent)

    def implied_shape(self, node: onnx.NodeProto, index: int, old: Shapes, new: Shapes) -> tuple[int, ...] | None:
        """The resized shape of input ``index`` of ``node``, an initializer no parameter names, from its role;
        None where the role does not tell."""
        return None

    def update(self, node: onnx.NodeProto, old: Shapes, new: Shapes) -> None:
        """Rewrite the attributes of ``node`` that record a width, its inputs having changed shape (in place);
        ResizeError where they cannot follow."""

    def constants(self, node: onnx.NodeProto, values: dict[int, np.ndarray], old: Shapes,
                  new: Shapes) -> dict[int, np.ndarray]:
        """The new values of the constant inputs of ``node`` (``values``: input index -> value) that record
        a width (a reshape's target), its inputs having changed shape; ResizeError where they cannot follow
        (a width it needs is computed, not constant)."""
        return {}


def attribute(node: onnx.NodeProto, name: str, default: int) -> int:
    """An integer attribute of ``node``, or ``default``."""
    return next((helper.get_attribute_value(a) for a in node.attribute if a.name == name), default)


def follow(shape: tuple, old_other: tuple, new_other: tuple) -> tuple[int, ...]:
    """A broadcast operand's new shape: each dim that matched the other operand's (and was not 1)
    follows it; dims of 1 broadcast and stay."""
    result = list(shape)
    for offset in range(1, min(len(shape), len(old_other)) + 1):
        if shape[-offset] != 1 and shape[-offset] == old_other[-offset]:
            result[-offset] = new_other[-offset]
    return tuple(result)
