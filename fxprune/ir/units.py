"""Unit specs: what a deployed layer's latency depends on besides its kept widths (a table's key).

``UnitSpec`` is the key every kind of timed layer shares; each kind is a subclass its rule defines
(``rules/conv.py``: ``ConvUnit``, ``ConvTransposeUnit``; ``rules/linear.py``: ``LinearUnit``), which knows
the layer's geometry, the ONNX nodes it is timed as and the torch module the torch engines time.
Engines and the latency pass call those methods and never ask which kind a unit is.
"""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from dataclasses import asdict, dataclass
from typing import Any, ClassVar, Protocol

import torch.nn as nn


@dataclass(frozen=True)
class Activation:
    """An activation as every engine can build it: a name and its numeric parameters."""

    name: str  # relu, clip, silu, hardswish, hardsigmoid, sigmoid, tanh, gelu, gelu_tanh, leaky_relu, elu, mish
    args: tuple[float, ...] = ()


class OnnxBuilder(Protocol):
    """What a unit kind writes its ONNX branch with (``backends/onnx_units.py`` holds the one used)."""

    def weight(self, name: str, shape: tuple[int, ...]) -> str: ...

    def constant(self, name: str, value: float) -> str: ...

    def node(self, op: str, inputs: list[str], output: str, **attrs: Any) -> str: ...


_KINDS: dict[str, type["UnitSpec"]] = {}  # op -> the kind's class, for specs read back from cache keys


@dataclass(frozen=True)
class UnitSpec(ABC):
    """What a unit's latency depends on, apart from its kept widths: the key of its latency table.

    A subclass per kind of layer (its ``op``, a rule's) says how the fields make a layer."""

    op: ClassVar[str] = ""  # the kind's name in cache keys
    # the layer's kernels whose profile shows no weight shape (onnxruntime prepacks their weights): a
    # profile's kernel of these ops is matched to the unit by its data and output shapes alone
    weightless_kernels: ClassVar[tuple[str, ...]] = ()
    input_shape: tuple[int, ...]  # full width, batch included
    out_channels: int
    kernel: tuple[int, ...] = ()
    stride: tuple[int, ...] = ()
    padding: tuple[int, ...] = ()  # per spatial dim, begin and end: (b0, b1, ..., e0, e1, ...)
    dilation: tuple[int, ...] = ()
    groups: int = 1
    bias: bool = True  # after BatchNorm folding
    batch_norm: bool = False  # folded by engines that fold it (onnxruntime), run by those that don't (torch)
    activation: Activation | None = None
    dtype: str = "float32"

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if cls.op and _KINDS.setdefault(cls.op, cls) is not cls:
            raise ValueError(f"two unit kinds are named {cls.op!r}: {_KINDS[cls.op].__name__} and {cls.__name__}")

    # --- what each kind says --------------------------------------------------------------------
    @property
    @abstractmethod
    def channel_dim(self) -> int:
        """The input's (and output's) channel axis."""

    @property
    @abstractmethod
    def output_shape(self) -> tuple[int, ...]:
        """The layer's output at full width (what an engine's profile shows it writing)."""

    @property
    @abstractmethod
    def weight_shapes(self) -> tuple[tuple[int, ...], ...]:
        """The weight's shape as an engine may hold it (a linear's either way round)."""

    @property
    def folds_batch_norm(self) -> bool:
        """Whether a BatchNorm right after the layer is part of the unit (folded into it on export)."""
        return False

    @abstractmethod
    def layer_name(self) -> str:
        """The layer in a few words, for reports (``describe`` adds the fused ops)."""

    @abstractmethod
    def onnx_branch(self, b: OnnxBuilder, x: str, width_in: int, width_out: int, prefix: str) -> str:
        """One branch of a timing model: a producer making the unit's input (``width_in`` channels) from
        ``x``, so the layer reads what a kernel just wrote, then the layer at ``width_out`` with its bias,
        in the ops the exporter writes; every node of the layer named ``prefix...``. Returns its output."""

    @abstractmethod
    def torch_layer(self, width_in: int, width_out: int) -> nn.Module:
        """The layer at kept widths as torch runs it (its bias is ``layer_bias``)."""

    # --- shared -------------------------------------------------------------------------------------
    @property
    def in_channels(self) -> int:
        return self.input_shape[self.channel_dim]

    @property
    def tied(self) -> bool:
        """Grouped and depthwise convolutions lose whole groups: the input width follows the output."""
        return self.groups > 1

    def groups_at(self, width_out: int) -> int:
        """The group count at a kept output width (a tied layer keeps its groups' width)."""
        return self.groups * width_out // self.out_channels if self.tied else 1

    @property
    def layer_bias(self) -> bool:
        """Whether the layer torch runs has a bias: a BatchNorm run after it brings its own shift."""
        return self.bias and not self.batch_norm

    def input_at(self, width_in: int) -> tuple[int, ...]:
        """The input's shape at a kept input width."""
        shape = list(self.input_shape)
        shape[self.channel_dim] = width_in
        return tuple(shape)

    def torch_norm(self, width_out: int) -> nn.Module:
        """The BatchNorm the torch engines run after the layer (they do not fold it)."""
        rank = len(self.output_shape)
        return (nn.BatchNorm1d, nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)[rank - 2](width_out)

    def to_key(self) -> dict[str, Any]:
        return json.loads(json.dumps({"op": self.op, **asdict(self)}))  # plain JSON types: tuples become lists

    @staticmethod
    def from_key(key: dict[str, Any]) -> "UnitSpec":
        """The spec a cache key holds, of the kind its ``op`` names."""
        kind = _KINDS.get(key.get("op", ""))
        if kind is None:
            raise ValueError(f"no unit kind {key.get('op')!r} (known: {', '.join(sorted(_KINDS))})")
        values: dict[str, Any] = {name: tuple(value) if isinstance(value, list) else value
                                  for name, value in key.items() if name != "op"}
        if values.get("activation") is not None:
            values["activation"] = Activation(values["activation"]["name"], tuple(values["activation"]["args"]))
        return kind(**values)

    def describe(self) -> str:
        tail = "".join(f"+{name}" for name, on in (("bn", self.batch_norm),
                                                     (self.activation.name if self.activation else "", True))
                       if on and name)
        return self.layer_name() + tail
