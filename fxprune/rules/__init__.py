"""One rule per operation kind (``Rule``), and ``RULES``, the registry that finds a node's rule.

Adding an operation is one ``Rule`` subclass (its keys: module classes, functions or ATen ops, method
names) added to the list below, and its tests; see docs/architecture.md.
"""

from fxprune.rules.attention import MultiheadAttention, ScaledDotProductAttention, WindowAttention
from fxprune.rules.attributes import resize_attributes
from fxprune.rules.base import Kept, Registry, Rule, TensorAxis, input_space, kept_of
from fxprune.rules.conv import Conv
from fxprune.rules.coupling import ChannelBuilder
from fxprune.rules.elementwise import Elementwise, NoChannels, Output, Passthrough, Reduction, Softmax
from fxprune.rules.linear import AddMM, Embedding, Linear
from fxprune.rules.norm import ChannelNorm, GroupNorm, LayerNorm
from fxprune.rules.shape import Cat, GetItem, Shape, Split, Stack, Unbind

_PASSTHROUGH, _SHAPE, _WINDOW = Passthrough(), Shape(), WindowAttention()
_OUTPUT, _NO_CHANNELS = Output(), NoChannels()

RULES = Registry(
    [_PASSTHROUGH, Elementwise(), Reduction(), Softmax(), _OUTPUT, _NO_CHANNELS, _SHAPE, Cat(), Stack(), Split(),
     GetItem(), Unbind(), Conv(), Linear(), AddMM(), Embedding(), ChannelNorm(), GroupNorm(), LayerNorm(),
     MultiheadAttention(), ScaledDotProductAttention(), _WINDOW],
    fallback=Rule(), no_channels=_NO_CHANNELS, output=_OUTPUT,
    # functions fx keeps as calls (torch.fx.wrap) that are known by name: torchvision's, and fxprune's own
    by_name_of_function={**{name: _PASSTHROUGH for name in Passthrough.wrapped},
                         **{name: _SHAPE for name in Shape.wrapped}, "shifted_window_attention": _WINDOW},
)

__all__ = ["RULES", "ChannelBuilder", "Kept", "Registry", "Rule", "TensorAxis", "input_space", "kept_of",
           "resize_attributes"]
