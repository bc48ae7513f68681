"""Reference semantics for tests and users: what pruning must compute, by masking instead of removing."""

from __future__ import annotations

from typing import Any

import torch
import torch.fx

from fxprune.ir import graph
from fxprune.ir.channels import Plan
from fxprune.ir.keys import ANALYSIS_KEY
from fxprune.passes.rewrite import keep_masks


class MaskedInterpreter(torch.fx.Interpreter):
    """Runs an analysed graph with every removed channel zeroed wherever it appears.

    The pruned model must match this output (up to float rounding) except in groups that pass
    through a normalization computing statistics across channels (``ChannelGroup.norm_coupled``).
    """

    def __init__(self, gm: torch.fx.GraphModule, plan: Plan) -> None:
        super().__init__(gm)
        self.masks = {gid: torch.as_tensor(mask) for gid, mask in keep_masks(gm, plan).items()}
        self.zero = {gm.meta[ANALYSIS_KEY].blocks[b].output for b in plan.drop}  # removed blocks' branches

    def run_node(self, n: torch.fx.Node) -> Any:
        result = super().run_node(n)
        if n.name in self.zero:
            return torch.zeros_like(result)
        spaces = graph.channels(n).spaces
        if not spaces:
            return result
        if isinstance(result, torch.Tensor):
            return self._mask(result, spaces[0])
        if isinstance(result, (tuple, list)):
            masked = [self._mask(r, s) if s is not None and isinstance(r, torch.Tensor) else r
                      for r, s in zip(result, list(spaces) + [None] * (len(result) - len(spaces)))]
            return type(result)(masked)
        return result

    def _mask(self, tensor: torch.Tensor, space) -> torch.Tensor:
        if space is None:
            return tensor
        keep = self.masks[space.group_id][torch.as_tensor(space.channel_index)]
        if bool(keep.all()):
            return tensor
        view = [1] * tensor.dim()
        view[space.dim] = space.size
        # where, not a product: a removed entry may hold inf (a frozen BatchNorm's rsqrt of a zeroed variance),
        # and inf * 0 would carry NaN into the kept channels
        return torch.where(keep.view(view).to(tensor.device), tensor, torch.zeros((), dtype=tensor.dtype))


def masked_forward(gm: torch.fx.GraphModule, plan: Plan, *inputs: Any) -> Any:
    """Output of the analysed model with ``plan``'s removed channels zeroed (no parameters change)."""
    with torch.no_grad():
        return MaskedInterpreter(gm, plan).run(*inputs)


# --- the torchvision model zoo, as tests and benchmarks build it -----------------------------------
SEGMENTATION_MODELS = (
    "fcn_resnet50", "fcn_resnet101", "deeplabv3_resnet50", "deeplabv3_resnet101",
    "deeplabv3_mobilenet_v3_large", "lraspp_mobilenet_v3_large",
)
# The smallest member of each family: what the default test run covers.
FAMILY_REPRESENTATIVES = (
    "alexnet", "convnext_tiny", "densenet121", "efficientnet_b0", "efficientnet_v2_s", "googlenet",
    "inception_v3", "maxvit_t", "mnasnet0_5", "mobilenet_v2", "mobilenet_v3_small", "regnet_x_400mf",
    "regnet_y_400mf", "resnet18", "resnext50_32x4d", "shufflenet_v2_x0_5", "squeezenet1_1", "swin_t",
    "swin_v2_t", "vgg11", "vgg11_bn", "vit_b_32", "wide_resnet50_2",
    "fcn_resnet50", "deeplabv3_mobilenet_v3_large", "lraspp_mobilenet_v3_large",
)
_FAMILY_PREFIXES = ("efficientnet_v2", "mobilenet_v3", "regnet_x", "regnet_y", "swin_v2", "wide_resnet",
                    "shufflenet_v2", "fcn", "deeplabv3", "lraspp")


def family(name: str) -> str:
    """Family of a torchvision model name: 'resnet' for resnet50, 'vgg_bn' for vgg16_bn..."""
    for prefix in _FAMILY_PREFIXES:
        if name.startswith(prefix):
            return prefix
    if name.startswith("vgg"):
        return "vgg_bn" if name.endswith("_bn") else "vgg"
    return name.split("_")[0].rstrip("0123456789")


def classification_models() -> list[str]:
    import torchvision

    return list(torchvision.models.list_models(module=torchvision.models))


def build_torchvision_model(name: str, *, small: bool = True, seed: int = 0):
    """A torchvision model with random weights (no download), in eval mode, and an example input.

    ``small`` shrinks the input (and ViT's image size) to keep tests fast; architectures that fix their
    resolution (MaxViT) keep 224. Weights are re-drawn so no layer is zero-initialised (a zero head
    would make every comparison trivially pass).
    """
    import torchvision

    kwargs: dict = {}
    size = 224
    if name in SEGMENTATION_MODELS:
        kwargs["weights_backbone"] = None
        size = 64 if small else 224
    elif small and name.startswith("vit_"):
        patch = int(name.rsplit("_", 1)[1])
        kwargs["image_size"] = size = patch * max(1, 64 // patch)  # a multiple of the patch size
    elif small and name != "maxvit_t":
        size = 96 if name == "inception_v3" else 64
    if name in ("googlenet", "inception_v3"):
        kwargs["init_weights"] = False
    torch.manual_seed(seed)
    model = torchvision.models.get_model(name, weights=None, **kwargs).eval()
    randomize_parameters(model, seed)
    example = torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(seed))
    return model, (example,)


@torch.no_grad()
def randomize_parameters(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Re-draw every parameter and norm statistic so activations stay O(1) and nothing is zero; buffers the
    model computes rather than saves (non-persistent: rotary frequencies) stay as they are."""
    generator = torch.Generator().manual_seed(seed)
    for module in model.modules():
        for name, tensor in list(module.named_parameters(recurse=False)) + list(module.named_buffers(recurse=False)):
            if not tensor.is_floating_point() or name in module._non_persistent_buffers_set:
                continue
            if name == "running_var" or (name == "weight" and tensor.dim() == 1):
                new = torch.rand(tensor.shape, generator=generator) + 0.5
            elif tensor.dim() >= 2:
                fan_in = tensor[0].numel() if not isinstance(module, torch.nn.MultiheadAttention) else tensor.shape[-1]
                new = torch.randn(tensor.shape, generator=generator) / max(fan_in, 1) ** 0.5
            else:
                new = torch.randn(tensor.shape, generator=generator) * 0.1
            tensor.copy_(new.to(tensor.dtype))
    return model
