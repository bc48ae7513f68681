"""Saving and loading pruned models: the user's own class, or the pruned graph.

- ``.pt``: the module object compile returned (the user's class, pruned; or, with ``output="graph"``,
  the GraphModule, which reloads without the model's code), with its plan and report; ``fxprune.load``
  gives it back for ``fxprune.report``/``fxprune.plan_of``. It is a pickle: load only files you trust.
  An ultralytics model is written as ultralytics' own checkpoint (``yolo.py``), which ``YOLO(path)`` loads.
- A folder (no suffix), for a Hugging Face model: ``save_pretrained`` and the pruned sizes
  (``huggingface.py``); ``fxprune.load`` builds the same class at those sizes.
- ``.pt2``: ``torch.export``'s ExportedProgram (ATen ops only, no Python of the model at all), with the
  plan and report as extra files; ``fxprune.load`` gives back its ``.module()``.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any

import torch
import torch.fx

from fxprune.backends.export import double_batch
from fxprune.errors import SaveError
from fxprune.frontends.partition import assemble
from fxprune.huggingface import is_hugging_face, load_folder, save_folder
from fxprune.ir import Plan
from fxprune.ir.capture import PARTITIONED, capture_of, flat_view, is_partitioned, structured
from fxprune.ir.graph import inference
from fxprune.ir.keys import CAPTURE_KEY, PLAN_KEY, REPORT_KEY
from fxprune.reports import Report
from fxprune.yolo import HEADER_KEY, is_checkpoint, is_ultralytics, save_checkpoint

FORMAT = "fxprune-model/1"


def save(gm: torch.nn.Module, path: str | os.PathLike, example_inputs: Any = None) -> Path:
    """Write ``gm``, what ``fxprune.compile`` returned, to ``path``: ``.pt`` (the module object, plan, report;
    for an ultralytics model, ultralytics' checkpoint, which ``YOLO(path)`` loads: ``yolo.py``), ``.pt2``
    (torch.export; needs ``example_inputs``), or, for a Hugging Face model, a folder (no suffix) that
    ``fxprune.load`` reads back (``huggingface.py``)."""
    path = Path(path)
    if not isinstance(gm, torch.nn.Module):
        raise SaveError(f"expected the module fxprune.compile returned, got {type(gm).__name__}")
    plan, report = getattr(gm, "meta", {}).get(PLAN_KEY), _report(gm)
    _check_writable(path)
    capture, parts = capture_of(gm), is_partitioned(gm)
    if path.suffix == "" and is_hugging_face(gm):
        save_folder(gm, path, {"plan": plan.to_json() if plan else None, "report": report})
    elif path.suffix == "":
        raise SaveError(f"{path} has no suffix: a folder is written for Hugging Face models only; save "
                        f"{type(gm).__name__} to a .pt or .pt2 file")
    elif path.suffix == ".pt" and is_ultralytics(gm) and not parts:  # what ultralytics.YOLO(path) loads
        save_checkpoint(gm, path, {"format": FORMAT, "plan": plan.to_json() if plan else None, "report": report})
    elif path.suffix == ".pt":  # a graph captured by torch.export is stored flat, its structure beside it
        if parts and capture is not None:
            module = assemble(gm, {p.path: flat_view(gm.get_submodule(p.path)) for p in capture.parts})
        else:
            module = flat_view(gm)
        torch.save({"format": FORMAT, "module": module, "plan": plan.to_json() if plan else None,
                    "report": report, "capture": capture}, path)
    elif path.suffix == ".pt2" and parts:
        raise SaveError("a model captured in parts runs Python that torch.export could not capture; save it to .pt")
    elif path.suffix == ".pt2":
        if example_inputs is None:
            raise SaveError("saving to .pt2 runs torch.export, which needs example_inputs=(tensor, ...)")
        inputs = tuple(example_inputs) if isinstance(example_inputs, (tuple, list)) else (example_inputs,)
        dims = tuple({0: torch.export.Dim.DYNAMIC} if x.dim() else None for x in inputs)
        try:
            # traced at a batch of 2, so that the batch size stays free (not 0/1-specialized)
            with inference(gm, grad=None):
                program = torch.export.export(gm, double_batch(inputs), dynamic_shapes=dims)
        except Exception as exc:  # torch.export raises many kinds
            raise SaveError(f"torch.export could not capture the model: {type(exc).__name__}: {exc}; save to .pt "
                            "instead") from exc
        extra = {"fxprune.json": json.dumps({"format": FORMAT, "plan": plan.to_json() if plan else None,
                                             "report": report})}
        torch.export.save(program, path, extra_files=extra)
    else:
        raise SaveError(f"save to a .pt (GraphModule) or .pt2 (torch.export) file, not {path.name!r}; for ONNX use "
                        "fxprune.export_onnx")
    return path


def load(path: str | os.PathLike) -> torch.nn.Module:
    """A model written by ``fxprune.save``, with its plan and report where they were saved."""
    path = Path(path)
    if not path.exists():
        raise SaveError(f"no such file: {path}")
    if path.is_dir():
        module, header = load_folder(path)
        return restore(module, {**header, "capture": None})
    try:
        if path.suffix == ".pt2":
            extra = {"fxprune.json": ""}
            module = torch.export.load(path, extra_files=extra).module()
            header = json.loads(extra["fxprune.json"] or "{}")
        else:
            header = torch.load(path, weights_only=False, map_location="cpu")
    except Exception as error:  # torch.load and torch.export.load raise many kinds
        raise SaveError(f"{path} is not a file fxprune.save wrote ({type(error).__name__}: {str(error)[:120]}); "
                        "load and report read the .pt or .pt2 written by `fxprune prune -o X.pt` or fxprune.save "
                        "(an ONNX file keeps no plan or report)") from error
    if is_checkpoint(header):  # an ultralytics checkpoint fxprune.save wrote
        return restore(header["model"], header[HEADER_KEY])
    if path.suffix != ".pt2":
        if not is_saved(header):
            raise SaveError(f"{path} was not written by fxprune.save (format {FORMAT}); load it with torch.load")
        module = header["module"]
    if header.get("format") != FORMAT:
        raise SaveError(f"{path} was not written by fxprune.save (format {FORMAT})")
    return restore(module, header)


def _check_writable(path: Path) -> None:
    """Fail before any work where ``path`` cannot be written."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise SaveError(f"cannot write {path}: {error.strerror or error}; choose a folder you can write to") from error
    if not os.access(path.parent, os.W_OK) or (path.exists() and not path.is_dir() and not os.access(path, os.W_OK)):
        raise SaveError(f"cannot write {path}: permission denied; choose a folder you can write to")


def is_saved(obj: Any) -> bool:
    """Whether ``obj`` (what torch.load returned) is a file fxprune.save wrote."""
    return isinstance(obj, dict) and obj.get("format") == FORMAT and "module" in obj


def restore(module: torch.nn.Module, header: dict) -> torch.nn.Module:
    """Put a saved plan and report back on the module's meta."""
    meta = getattr(module, "meta", None)
    if meta is None:
        module.meta = meta = {}  # type: ignore[assignment]  # torch types Module attributes as tensors or modules
    if header.get("plan"):
        meta[PLAN_KEY] = Plan.from_json(header["plan"])
    if header.get("report"):
        meta[REPORT_KEY] = Report.from_dict(header["report"])
    capture = header.get("capture")
    if capture is not None:
        meta[CAPTURE_KEY] = capture
        for part in capture.parts:  # parts saved as graphs (compile's output="graph") are called as before
            piece = module.get_submodule(part.path)
            if isinstance(piece, torch.fx.GraphModule):
                piece.meta[CAPTURE_KEY] = part.capture
                structured(piece)
        if capture.path != PARTITIONED:
            structured(module)
    return module


def _report(gm: torch.nn.Module) -> dict | None:
    report = getattr(gm, "meta", {}).get(REPORT_KEY)
    return dataclasses.asdict(report) if report is not None else None
