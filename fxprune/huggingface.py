"""A pruned Hugging Face model as a Hugging Face folder: ``save_pretrained``'s config and safetensors, and
the pruned sizes in a file of ours, since the config holds one width per kind of layer and a pruned model
has one per layer.

``fxprune_sizes.json`` records, against the model the config builds, every module field that differs
(``out_features``, ``num_attention_heads``, ``split_size``...), every tensor whose shape differs and the
modules of residual blocks the plan removed (``Skip``, ``ZeroBranch``), so
``load_folder`` builds the config's model, sets those, and loads the weights into it: the user's class,
at the pruned widths, with nothing of the original model needed.
"""

from __future__ import annotations

import json
import numbers
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from fxprune.errors import SaveError
from fxprune.modules import Skip, ZeroBranch
from fxprune.passes.shrink import replace_tensors

REMOVED = (Skip, ZeroBranch)
REMOVED_BY_NAME = {cls.__name__: cls for cls in REMOVED}
SIZES_FILE = "fxprune_sizes.json"
SIZES_FORMAT = "fxprune-hf-sizes/1"


def is_hugging_face(model: nn.Module) -> bool:
    """A transformers ``PreTrainedModel`` (it has a config and ``save_pretrained``)."""
    return hasattr(model, "save_pretrained") and hasattr(model, "config") and \
        type(model).__module__.startswith("transformers.")


def save_folder(model: nn.Module, folder: Path, header: dict[str, Any]) -> Path:
    """``model.save_pretrained(folder)`` plus ``fxprune_sizes.json`` (its sizes, and ``header``: plan, report)."""
    fresh = _fresh(type(model), model.config)
    fields, tensors, removed = {}, {}, {}
    fresh_modules = dict(fresh.named_modules())
    for name, module in model.named_modules():
        if isinstance(module, REMOVED):  # a residual block (or its branch) the plan removed
            removed[name] = type(module).__name__
            if getattr(module, "returns", 0):
                fields[name] = {"returns": module.returns}  # a zero branch standing for a module that returned a tuple
            continue
        base = fresh_modules.get(name)
        if base is None or type(base) is not type(module):
            raise SaveError(f"{name or 'the model'} is a {type(module).__name__} where {type(model).__name__}'s "
                            "config builds another module; save it to a .pt file instead")
        changed = {key: value for key, value in _size_fields(module).items() if _size_fields(base).get(key) != value}
        if changed:
            fields[name] = changed
    fresh_shapes = {k: tuple(v.shape) for k, v in fresh.state_dict().items()}
    for key, value in model.state_dict().items():
        if fresh_shapes.get(key) != tuple(value.shape):
            tensors[key] = list(value.shape)
    folder.mkdir(parents=True, exist_ok=True)
    pretrained: Any = model  # a transformers PreTrainedModel (is_hugging_face)
    pretrained.save_pretrained(folder)
    record = {"format": SIZES_FORMAT, "class": type(model).__name__, "fields": fields, "tensors": tensors,
              "removed": removed, **header}
    (folder / SIZES_FILE).write_text(json.dumps(record, indent=1))
    return folder


def load_folder(folder: Path) -> tuple[nn.Module, dict[str, Any]]:
    """The model ``save_folder`` wrote, its own class at its pruned sizes, and the header saved with it."""
    sizes_file = folder / SIZES_FILE
    if not sizes_file.exists():
        raise SaveError(f"{folder} has no {SIZES_FILE}: it was not written by fxprune.save; a Hugging Face folder "
                        "of an unpruned model loads with from_pretrained")
    try:
        record = json.loads(sizes_file.read_text())
        fields, tensors, name = record["fields"], record["tensors"], record["class"]
    except (ValueError, KeyError) as error:
        raise SaveError(f"{sizes_file} is not fxprune's size record (missing or unreadable key {error})") from error
    import transformers  # an optional dependency, needed only for these folders

    config = transformers.AutoConfig.from_pretrained(folder)
    cls = getattr(transformers, name, None)
    if cls is None:
        raise SaveError(f"{sizes_file}: key 'class' names {name!r}, which this transformers does not have")

    def at_pruned_sizes(model: nn.Module) -> None:
        for path, kind in record.get("removed", {}).items():
            if kind not in REMOVED_BY_NAME:
                raise SaveError(f"{sizes_file}: key 'removed' names {kind!r} for {path!r}; fxprune writes "
                                f"{' or '.join(REMOVED_BY_NAME)}")
            model.set_submodule(path, REMOVED_BY_NAME[kind]())
        modules = dict(model.named_modules())
        for module_name, changed in fields.items():
            if module_name not in modules:
                raise SaveError(f"{sizes_file}: key 'fields' names module {module_name!r}, which {name} does not have")
            for key, value in changed.items():
                setattr(modules[module_name], key, tuple(value) if isinstance(value, list) else value)
        state, new_by_old = model.state_dict(keep_vars=True), {}
        for key, shape in tensors.items():
            if key not in state:
                raise SaveError(f"{sizes_file}: key 'tensors' names {key!r}, which {name} does not have")
            new_by_old[id(state[key])] = _empty_like(state[key], tuple(shape))
        replace_tensors(model, new_by_old)  # the weights are loaded into them next

    def __init__(self, config, *args, **kwargs):  # the config's model, then the pruned sizes: weights load into them
        cls.__init__(self, config, *args, **kwargs)
        at_pruned_sizes(self)

    pruned_cls: Any = type(cls.__name__, (cls,), {"__init__": __init__, "__module__": cls.__module__})
    try:  # Hugging Face's own loader: its key renaming, tied weights, dtype
        model = pruned_cls.from_pretrained(folder, config=config)
    except (RuntimeError, ValueError) as error:
        raise SaveError(f"{folder}: the weights do not fit the sizes in {SIZES_FILE}: "
                        f"{str(error).strip().splitlines()[-1][:300]}") from error
    model.__class__ = cls
    return model.eval(), record


class DecodeStep(nn.Module):
    """One generated token of a Hugging Face decoder with a key-value cache of ``tokens`` past tokens: what a
    ``Latency(phase="decode")`` budget times and analyses. The cache is computed once from random tokens and
    kept as buffers, read by each call (not grown), so a captured step indexes the cache's kv heads with the
    heads it prunes. ``model`` is the decoder itself: a plan on this module applies to it."""

    def __init__(self, model: nn.Module, tokens: int, batch: int) -> None:
        super().__init__()
        self.model, self.tokens, self.batch = model, tokens, batch
        config: Any = model.config  # a Hugging Face decoder's (decodes)
        ids = torch.randint(0, config.vocab_size, (batch, tokens), generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            cache = model(input_ids=ids, use_cache=True).past_key_values
        self.layers = [index for index, layer in enumerate(cache.layers) if getattr(layer, "keys", None) is not None
                       and layer.keys.numel()]  # a layer whose attention went keeps no cache
        for index in self.layers:
            self.register_buffer(f"past_keys_{index}", cache.layers[index].keys.detach().clone())
            self.register_buffer(f"past_values_{index}", cache.layers[index].values.detach().clone())

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        import transformers  # an optional dependency, needed only for these models

        config: Any = self.model.config
        cache = transformers.DynamicCache(config=config)
        for index in self.layers:
            keys, values = getattr(self, f"past_keys_{index}"), getattr(self, f"past_values_{index}")
            if input_ids.shape[0] != keys.shape[0]:  # checked at other batches: the same cache for each row
                keys, values = (t.expand(input_ids.shape[0], *t.shape[1:]) for t in (keys, values))
            layer: Any = cache.layers[index]  # an attention layer's (self.layers holds those with keys)
            layer.lazy_initialization(keys, values)
            layer.keys, layer.values = keys, values
        positions = torch.arange(self.tokens, self.tokens + input_ids.shape[1]).expand(input_ids.shape[0], -1)
        return self.model(input_ids=input_ids, past_key_values=cache, position_ids=positions, use_cache=True).logits


class Prefill(nn.Module):
    """A decoder's forward over a prompt, its inputs in the order of ``names``, returning the logits: the
    phase a both-phase latency budget times beside the decode step."""

    def __init__(self, model: nn.Module, names: list[str]) -> None:
        super().__init__()
        self.model, self.names = model, names

    def forward(self, *values: torch.Tensor) -> torch.Tensor:
        return self.model(**dict(zip(self.names, values)), use_cache=False).logits


def decodes(model: nn.Module) -> bool:
    """A Hugging Face model that generates with a key-value cache (a decoder a decode budget applies to)."""
    return is_hugging_face(model) and bool(getattr(model, "can_generate", lambda: False)()) \
        and not getattr(model.config, "is_encoder_decoder", False)


def _fresh(cls: type, config: Any) -> nn.Module:
    """The model ``config`` builds, in eval mode (its weights are overwritten or compared by shape only)."""
    return cls(config).eval()


def _size_fields(module: nn.Module) -> dict[str, Any]:
    """A module's plain int, float and int-tuple fields: where modules and third-party blocks keep their sizes
    (and the epsilon of an RMS norm over fewer channels, ``rules.elementwise.Reduction.shrink_module``)."""
    found: dict[str, Any] = {}
    for key, value in vars(module).items():
        if key.startswith("_") or isinstance(value, bool):
            continue
        if isinstance(value, numbers.Integral):
            found[key] = int(value)
        elif isinstance(value, float):
            found[key] = value
        elif isinstance(value, (tuple, list)) and value and all(isinstance(v, numbers.Integral) and
                                                                not isinstance(v, bool) for v in value):
            found[key] = [int(v) for v in value]
    return found


def _empty_like(old: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """An empty tensor of ``shape``, a parameter where ``old`` is one."""
    new = torch.empty(shape, dtype=old.dtype)
    return nn.Parameter(new, requires_grad=old.requires_grad) if isinstance(old, nn.Parameter) else new
