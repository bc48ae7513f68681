"""Unit specs: what a deployed layer's latency depends on besides its kept widths (a table's key)."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from typing import Any


@dataclass(frozen=True)
class Activation:
    """An activation as every engine can build it: a name and its numeric parameters."""

    name: str  # relu, clip, silu, hardswish, hardsigmoid, sigmoid, tanh, gelu, gelu_tanh, leaky_relu, elu, mish
    args: tuple[float, ...] = ()


@dataclass(frozen=True)
class UnitSpec:
    """What a unit's latency depends on, apart from its kept widths: the key of its latency table."""

    op: str  # "conv" or "linear"
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

    @property
    def in_channels(self) -> int:
        return self.input_shape[1] if self.op == "conv" else self.input_shape[-1]

    @property
    def tied(self) -> bool:
        """Grouped and depthwise convolutions lose whole groups: the input width follows the output."""
        return self.groups > 1

    @property
    def output_shape(self) -> tuple[int, ...]:
        """The layer's output at full width (what an engine's profile shows it writing)."""
        if self.op == "linear":
            return (*self.input_shape[:-1], self.out_channels)
        spatial = len(self.kernel)
        sizes = [(size + self.padding[d] + self.padding[spatial + d] - self.dilation[d] * (self.kernel[d] - 1) - 1)
                 // self.stride[d] + 1 for d, size in enumerate(self.input_shape[2:])]
        return (self.input_shape[0], self.out_channels, *sizes)

    @property
    def weight_shapes(self) -> tuple[tuple[int, ...], ...]:
        """The weight's shape as an engine may hold it (a linear's either way round)."""
        if self.op == "linear":
            return ((self.out_channels, self.in_channels), (self.in_channels, self.out_channels))
        return ((self.out_channels, self.in_channels // self.groups, *self.kernel),)

    def to_key(self) -> dict[str, Any]:
        return json.loads(json.dumps(asdict(self)))  # plain JSON types: tuples become lists

    @classmethod
    def from_key(cls, key: dict[str, Any]) -> "UnitSpec":
        fields: dict[str, Any] = {name: tuple(value) if isinstance(value, list) else value
                                  for name, value in key.items()}
        if fields.get("activation") is not None:
            fields["activation"] = Activation(fields["activation"]["name"], tuple(fields["activation"]["args"]))
        return cls(**fields)

    def describe(self) -> str:
        if self.op == "linear":
            core = f"linear {self.in_channels}->{self.out_channels} on {list(self.input_shape)}"
        else:
            kernel = "x".join(map(str, self.kernel))
            core = (f"conv{kernel} {self.in_channels}->{self.out_channels} /{self.stride[0]} "
                    f"at {'x'.join(map(str, self.input_shape[2:]))}" + (f" g{self.groups}" if self.groups > 1 else ""))
        tail = "".join(f"+{name}" for name, on in (("bn", self.batch_norm),
                                                     (self.activation.name if self.activation else "", True))
                       if on and name)
        return core + tail


# A unit every measuring session also runs: table entries are taken relative to it (see the engines).
REFERENCE = UnitSpec("conv", (1, 64, 28, 28), 64, (3, 3), (1, 1), (1, 1, 1, 1), (1, 1), 1, True, True,
                     Activation("relu"))
