"""A pruned ultralytics model in ultralytics' own checkpoint format, and a trainer that keeps its widths.

``ultralytics.YOLO("x.pt")`` unpickles the model object in a checkpoint (``{"model": ..., "train_args":
...}``), so the pruned widths load as they are, for ``.val``, ``.predict`` and ``.export``. Its trainer,
though, builds a new model from the yaml and copies the weights that fit: a pruned model would come
back at full width. ``pruned_trainer()`` is ultralytics' detection trainer that trains the checkpoint's
model itself: ``YOLO("x.pt").train(data=..., trainer=fxprune.yolo.pruned_trainer())``.
"""

from __future__ import annotations

import copy
import datetime
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

HEADER_KEY = "fxprune"  # the checkpoint's entry with fxprune's plan and report


def is_ultralytics(model: nn.Module) -> bool:
    """An ultralytics model (``DetectionModel`` and kin, as ``YOLO(...).model`` holds it)."""
    return type(model).__module__.startswith("ultralytics.")


def save_checkpoint(model: nn.Module, path: Path, header: dict[str, Any]) -> Path:
    """Write ``model`` as an ultralytics checkpoint, fxprune's plan and report in ``header`` beside it."""
    import ultralytics  # an optional dependency, needed only for these checkpoints

    saved = copy.deepcopy(model).float().eval()
    saved.__dict__.pop("meta", None)  # fxprune's objects stay out of the model: plain data in the header
    torch.save({"model": saved, "ema": None, "train_args": dict(getattr(model, "args", None) or {}),
                "date": datetime.datetime.now().isoformat(), "version": ultralytics.__version__,
                HEADER_KEY: header}, path)
    return path


def is_checkpoint(obj: Any) -> bool:
    """Whether ``obj`` (what torch.load returned) is a checkpoint ``save_checkpoint`` wrote."""
    return isinstance(obj, dict) and HEADER_KEY in obj and isinstance(obj.get("model"), nn.Module)


def pruned_trainer() -> type:
    """ultralytics' ``DetectionTrainer`` training the given model itself (the checkpoint's, pruned), not a
    new one built from its yaml: pass it as ``YOLO(path).train(..., trainer=pruned_trainer())``."""
    from ultralytics.models.yolo.detect import DetectionTrainer

    class PrunedDetectionTrainer(DetectionTrainer):
        def get_model(self, cfg: Any = None, weights: nn.Module | None = None, verbose: bool = True) -> nn.Module:
            if weights is None:
                return super().get_model(cfg, weights, verbose)
            model = copy.deepcopy(weights).float()
            layers: Any = model.model  # ultralytics' nn.Sequential of layers
            classes = getattr(layers[-1], "nc", None)  # the head's: its last layer's widths hold them
            if classes != self.data["nc"]:
                raise ValueError(f"the pruned model predicts {classes} classes and the data has {self.data['nc']}: "
                                 "fine-tune it on data with the classes it was built for")
            for parameter in model.parameters():
                parameter.requires_grad_(True)
            return self.set_model_names_for_load(model)

    return PrunedDetectionTrainer
