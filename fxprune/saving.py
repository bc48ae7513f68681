"""Saving and loading pruned models in formats that reload without the original model's code.

- ``.pt``: the GraphModule itself (its generated code, its standard submodules and weights), with the
  plan and report ``fxprune.compile`` attached; ``fxprune.load`` gives back a GraphModule that
  ``fxprune.report``/``fxprune.plan_of`` read. It is a pickle: load only files you trust.
- A model captured in parts (a whole torchvision detector) saves to ``.pt`` only: the model object with
  its pruned parts in place, so loading it needs the model's code importable (torchvision, your own
  module), as ``torch.load`` of any pickled model does; the parts themselves are generated code.
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
from fxprune.ir import Plan
from fxprune.ir.capture import PARTITIONED, capture_of, flat_view, is_partitioned, structured
from fxprune.ir.graph import inference
from fxprune.ir.keys import CAPTURE_KEY, PLAN_KEY, REPORT_KEY
from fxprune.passes.partition import assemble
from fxprune.reports import Report

FORMAT = "fxprune-model/1"


def save(gm: torch.fx.GraphModule, path: str | os.PathLike, example_inputs: Any = None) -> Path:
    """Write ``gm`` to ``path``: ``.pt`` (GraphModule, plan, report) or ``.pt2`` (torch.export; needs
    ``example_inputs``)."""
    path = Path(path)
    if not isinstance(gm, torch.nn.Module):
        raise SaveError(f"expected the module fxprune.compile returned, got {type(gm).__name__}")
    plan, report = gm.meta.get(PLAN_KEY) if hasattr(gm, "meta") else None, _report(gm)
    path.parent.mkdir(parents=True, exist_ok=True)
    capture, parts = capture_of(gm), is_partitioned(gm)
    if path.suffix == ".pt":  # a graph captured by torch.export is stored flat, its structure beside it
        module = assemble(gm, {p.path: flat_view(gm.get_submodule(p.path)) for p in capture.parts}) if parts \
            else flat_view(gm)
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
            with inference(gm, grad=None):  # traced at a batch of 2, so that the batch size stays free (not 0/1-specialized)
                program = torch.export.export(gm, double_batch(inputs), dynamic_shapes=dims)
        except Exception as exc:  # noqa: BLE001 - torch.export raises many kinds
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
    try:
        if path.suffix == ".pt2":
            extra = {"fxprune.json": ""}
            module = torch.export.load(path, extra_files=extra).module()
            header = json.loads(extra["fxprune.json"] or "{}")
        else:
            header = torch.load(path, weights_only=False, map_location="cpu")
    except Exception as error:  # noqa: BLE001 - torch.load and torch.export.load raise many kinds
        raise SaveError(f"{path} is not a file fxprune.save wrote ({type(error).__name__}: {str(error)[:120]}); "
                        "load and report read the .pt or .pt2 written by `fxprune prune -o X.pt` or fxprune.save "
                        "(an ONNX file keeps no plan or report)") from error
    if path.suffix != ".pt2":
        if not is_saved(header):
            raise SaveError(f"{path} was not written by fxprune.save (format {FORMAT}); load it with torch.load")
        module = header["module"]
    if header.get("format") != FORMAT:
        raise SaveError(f"{path} was not written by fxprune.save (format {FORMAT})")
    return restore(module, header)


def is_saved(obj: Any) -> bool:
    """Whether ``obj`` (what torch.load returned) is a file fxprune.save wrote."""
    return isinstance(obj, dict) and obj.get("format") == FORMAT and "module" in obj


def restore(module: torch.nn.Module, header: dict) -> torch.nn.Module:
    """Put a saved plan and report back on the module's meta."""
    meta = getattr(module, "meta", None)
    if meta is None:
        module.meta = meta = {}
    if header.get("plan"):
        meta[PLAN_KEY] = Plan.from_json(header["plan"])
    if header.get("report"):
        meta[REPORT_KEY] = Report.from_dict(header["report"])
    capture = header.get("capture")
    if capture is not None:
        meta[CAPTURE_KEY] = capture
        for part in capture.parts:
            piece = module.get_submodule(part.path)
            piece.meta[CAPTURE_KEY] = part.capture
            structured(piece)
        if capture.path != PARTITIONED:
            structured(module)
    return module


def _report(gm: torch.nn.Module) -> dict | None:
    report = getattr(gm, "meta", {}).get(REPORT_KEY)
    return dataclasses.asdict(report) if report is not None else None
