"""onnxruntime engine: which kernels of a profile it counts as memory traffic between layers."""

from fxprune.backends.ort import OWN_MEMORY_KERNELS, _Kernel, _moves_memory
from fxprune.rules import RULES


def test_memory_kernels_are_the_rules_and_the_engines_own():
    by_rule = {rule.name: rule.memory_kernels for rule in RULES.rules}
    assert "Concat" in by_rule["cat"] and "Softmax" in by_rule["softmax"] and "Gather" in by_rule["embedding"]
    for op in ("Concat", "Softmax", "MaxPool", "Transpose", "ReorderInput", "DequantizeLinear"):
        assert _moves_memory(_Kernel(op, [[1, 8, 4, 4], [1, 8, 4, 4]], [[1, 16, 4, 4]])), op
    assert not _moves_memory(_Kernel("Conv", [[1, 8, 4, 4], [16, 8, 3, 3]], [[1, 16, 4, 4]]))  # a layer
    assert not _moves_memory(_Kernel("Add", [[1, 16], [1]], [[1, 16]]))  # a bias added: part of its layer
    assert not OWN_MEMORY_KERNELS & RULES.memory_kernels  # each kernel has one home
