"""Coverage sweep: every torchvision classification and segmentation model, and one model of every timm
family, through fxprune.

For each model (random weights, batch 1, 224x224 or the model's own input size): analyse, prune with a
fixed random plan that keeps half of every prunable group, compare with the masked reference, export the
pruned model to ONNX and verify it in onnxruntime; timm models are also compiled to FLOPs(0.5). Each
model runs in its own subprocess (a crash or an out-of-memory costs one row, not the sweep). Writes
docs/coverage.json and docs/coverage_timm.json (one record per model) and docs/coverage.md.

    python benchmarks/coverage.py                 # every torchvision model (about an hour or more on 2 cores)
    python benchmarks/coverage.py resnet18 vit_b_16   # a few models
    python benchmarks/coverage.py --timm          # the smallest model of every timm family (timm from PyPI)
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

DOCS = Path(__file__).resolve().parent.parent / "docs"
EXEMPT_REASONS = ("model input", "model output")


def build_timm(name: str):
    """A timm model with random weights and an input of its configured size (224 where none is given)."""
    import timm
    import torch

    from fxprune.testing import randomize_parameters

    torch.manual_seed(0)
    model = randomize_parameters(timm.create_model(name, pretrained=False).eval())
    size = tuple(model.pretrained_cfg.get("input_size", (3, 224, 224)))
    return model, (torch.randn(1, *size, generator=torch.Generator().manual_seed(0)),)


def timm_families() -> dict[str, str]:
    """family (timm module) -> its model with the fewest parameters (counted on the meta device: no memory)."""
    import timm
    import torch

    smallest = {}
    for family in timm.list_modules():
        sizes = []
        for name in timm.list_models(module=family):
            try:
                with torch.device("meta"):
                    sizes.append((sum(p.numel() for p in timm.create_model(name, pretrained=False).parameters()), name))
            except Exception:  # noqa: BLE001 - a model that cannot be built on meta is measured as it fails later
                continue
        if sizes:
            smallest[family] = min(sizes)[1]
    return smallest


def measure(name: str, source: str = "torchvision") -> dict:
    """Run one model through the pipeline; every figure in the record is measured here."""
    import torch

    import fxprune
    from fxprune.testing import build_torchvision_model, masked_forward

    torch.set_num_threads(2)
    record: dict = {"model": name}
    if source == "timm":
        import timm.layers._fx as timm_fx

        model, inputs = build_timm(name)
        untraceable = {"leaf_modules": list(timm_fx.get_notrace_modules()),
                       "autowrap_functions": list(timm_fx.get_notrace_functions())}
    else:
        model, inputs = build_torchvision_model(name, small=False)
        untraceable = {}
    record["input_shape"] = list(inputs[0].shape)
    start = time.perf_counter()
    gm = fxprune.analyze(model, inputs, **untraceable)
    record["analyze_s"] = round(time.perf_counter() - start, 2)
    groups = fxprune.groups(gm)
    exempt = [g for g in groups if g.frozen_reason and all(
        part.startswith(EXEMPT_REASONS) for part in g.frozen_reason.split("; "))]
    counted = [g for g in groups if g not in exempt]
    record["groups"] = len(groups)
    record["prunable_groups"] = sum(g.prunable for g in groups)
    record["channels"] = sum(g.size for g in counted)
    record["prunable_channels"] = sum(g.size for g in counted if g.prunable)
    record["norm_coupled_channels"] = sum(g.size for g in counted if g.prunable and g.norm_coupled)
    frozen = Counter()
    for g in counted:
        if not g.prunable and g.frozen_reason:
            frozen[_short_reason(g.frozen_reason)] += g.size
    record["frozen"] = dict(frozen.most_common())

    def main(out):
        return out["out"] if isinstance(out, dict) else out

    exact_plan = fxprune.random_plan(gm, 0.5, seed=0, include_norm_coupled=False)
    pruned = fxprune.prune(gm, exact_plan)
    with torch.no_grad():
        expected = main(masked_forward(gm, exact_plan, *inputs))
        actual = main(pruned(*inputs))
    record["masked_rel_err"] = float((actual - expected).abs().max() / expected.abs().max())
    del pruned

    plan = fxprune.random_plan(gm, 0.5, seed=0)
    start = time.perf_counter()
    pruned = fxprune.prune(gm, plan)
    record["prune_s"] = round(time.perf_counter() - start, 2)
    record["params_before"] = sum(p.numel() for p in model.parameters())
    record["params_after"] = sum(p.numel() for p in pruned.parameters())
    if source == "timm":
        try:
            compiled = fxprune.compile(model, fxprune.FLOPs(0.5), inputs, **untraceable)
            report = fxprune.report(compiled)
            record["compile"] = f"ok (FLOPs {report.flops_after / report.flops_before:.1%})"
        except fxprune.FxpruneError as err:
            record["compile"] = "failed: " + str(err).splitlines()[0][:200]
    del model, gm
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        try:
            result = fxprune.export_onnx(pruned, Path(tmp) / f"{name}.onnx", inputs)
            record["export"] = f"ok ({result.exporter}, max abs diff {result.max_abs_diff:.1e})"
        except fxprune.FxpruneError as err:
            record["export"] = "failed: " + str(err).splitlines()[0][:200]
        record["export_s"] = round(time.perf_counter() - start, 1)
    return record


def _short_reason(reason: str) -> str:
    """The first cause of a frozen group, without node names, for a readable table."""
    first = reason.split("; ")[0]
    for marker in ("consumed by ", "its width is read", "its channel axis is split", "normalizes",
                   "reduces", "comes from an op", "selects individual", "pads or fills"):
        if marker in first:
            return marker.strip() + (" " + first.split("consumed by ")[1].split(" (")[0]
                                     if marker == "consumed by " else "")
    return first


def _all_models() -> list[str]:
    from fxprune.testing import SEGMENTATION_MODELS, classification_models

    return classification_models() + list(SEGMENTATION_MODELS)


def _write_markdown(records: list[dict]) -> None:
    import torch
    import torchvision

    lines = [
        "# Coverage: every torchvision model through fxprune",
        "",
        f"Generated by `python benchmarks/coverage.py` (torch {torch.__version__}, torchvision "
        f"{torchvision.__version__}, {os.cpu_count()} CPU cores). Random weights, batch 1, 224x224.",
        "",
        "- **prunable**: share of channels (summed over groups) in prunable groups, not counting the "
        "model's own input and output channels, which are never pruned.",
        "- **norm-coupled**: of those, channels whose group passes through a LayerNorm over channels "
        "(pruned exactly, but not comparable to masking).",
        "- **params**: before and after the fixed random plan (keep half of every prunable group, seed 0).",
        "- **masked err**: max |pruned - masked| / max |masked| for the same plan on groups that no "
        "normalization mixes (the equivalence check).",
        "- **export**: the pruned model exported with `fxprune.export_onnx`, checked, and compared with "
        "torch in onnxruntime at batch 1 and 2.",
        "",
        "| model | groups (prunable) | prunable | norm-coupled | params before → after | masked err | "
        "export | frozen (channels: first reason) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in records:
        if "error" in r:
            lines.append(f"| {r['model']} | – | – | – | – | – | – | **failed**: {r['error']} |")
            continue
        share = r["prunable_channels"] / max(r["channels"], 1)
        norm = r["norm_coupled_channels"] / max(r["channels"], 1)
        frozen = "; ".join(f"{n}: {why}" for why, n in r["frozen"].items()) or "–"
        lines.append(
            f"| {r['model']} | {r['groups']} ({r['prunable_groups']}) | {share:.1%} | {norm:.0%} | "
            f"{r['params_before'] / 1e6:.1f}M → {r['params_after'] / 1e6:.1f}M | {r['masked_rel_err']:.1e} | "
            f"{r['export']} | {frozen} |")
    ok = [r for r in records if "error" not in r]
    exported = [r for r in ok if r["export"].startswith("ok")]
    exact = [r for r in ok if r["masked_rel_err"] < 1e-4]
    lines += ["", f"**Summary**: {len(ok)}/{len(records)} models analysed and pruned, {len(exact)} match the "
              f"masked reference to 1e-4, {len(exported)} export and match in onnxruntime."]
    timm_path = DOCS / "coverage_timm.json"
    if timm_path.exists():
        lines += _timm_markdown(json.loads(timm_path.read_text()))
    (DOCS / "coverage.md").write_text("\n".join(lines) + "\n")


def _timm_markdown(records: list[dict]) -> list[str]:
    """The timm section: one model per family (its smallest), the same checks, and compile to FLOPs(0.5)."""
    import timm

    lines = ["", "## timm: one model of every family", "",
             f"Generated by `python benchmarks/coverage.py --timm` (timm {timm.__version__}): for every timm "
             "module (family), the model with the fewest parameters, random weights, its configured input size. "
             "timm's own untraceable modules and functions (`timm.layers` notrace registry) are passed to "
             "`fxprune.analyze` as `leaf_modules`/`autowrap_functions`, so their channels are frozen. Columns as "
             "above, plus **compile**: `fxprune.compile(model, FLOPs(0.5))`.", "",
             "| family | model | input | prunable | masked err | compile | export | failure or first frozen reason |",
             "|---|---|---|---|---|---|---|---|"]
    for r in records:
        if "error" in r:
            lines.append(f"| {r['family']} | {r['model']} | – | – | – | – | – | **failed**: {r['error']} |")
            continue
        share = r["prunable_channels"] / max(r["channels"], 1)
        frozen = next(iter(r["frozen"]), "–")
        lines.append(f"| {r['family']} | {r['model']} | {'x'.join(map(str, r['input_shape'][2:]))} | {share:.0%} | "
                     f"{r['masked_rel_err']:.1e} | {r['compile']} | {r['export']} | {frozen} |")
    ok = [r for r in records if "error" not in r]
    good = [r for r in ok if r["masked_rel_err"] < 1e-4 and r["compile"].startswith("ok") and r["export"].startswith("ok")]
    total = len(timm.list_modules())
    lines += ["", f"**Summary**: {len(ok)}/{len(records)} families trace and prune, {len(good)} of them also match "
              "the masked reference to 1e-4, compile to FLOPs(0.5) and export and match in onnxruntime."]
    if len(records) < total:
        lines.append(f"Run so far on {len(records)} of timm's {total} families; the others have not been run yet "
                     "(`--resume` continues).")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("models", nargs="*", help="model names (default: all)")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # child process mode
    parser.add_argument("--timm", action="store_true", help="one model of every timm family instead")
    parser.add_argument("--timeout", type=int, default=1800, help="seconds per model")
    parser.add_argument("--resume", action="store_true", help="skip models already in the JSON results")
    args = parser.parse_args()
    source = "timm" if args.timm else "torchvision"
    if args.one:
        print(json.dumps(measure(args.one, source)))
        return
    if args.timm:
        families = timm_families()
        family_of = {model: family for family, model in families.items()}
        names = args.models or list(families.values())
        path, order = DOCS / "coverage_timm.json", list(dict.fromkeys([*families.values(), *names]))
    else:
        names, path, order, family_of = args.models or _all_models(), DOCS / "coverage.json", _all_models(), {}
    records = {r["model"]: r for r in json.loads(path.read_text())} if path.exists() else {}
    for name in names:
        if args.resume and name in records:
            continue
        start = time.perf_counter()
        try:
            proc = subprocess.run([sys.executable, __file__, "--one", name] + ["--timm"] * args.timm,
                                  capture_output=True, text=True, timeout=args.timeout)
            if proc.returncode == 0:
                records[name] = json.loads(proc.stdout.strip().splitlines()[-1])
            else:
                tail = (proc.stderr.strip().splitlines() or ["exit code %d" % proc.returncode])[-1]
                records[name] = {"model": name, "error": tail[:200]}
        except subprocess.TimeoutExpired:
            records[name] = {"model": name, "error": f"timed out after {args.timeout} s"}
        if name in family_of:
            records[name]["family"] = family_of[name]
        print(f"{name}: {time.perf_counter() - start:.0f}s {records[name].get('export', records[name].get('error'))}",
              flush=True)
        path.write_text(json.dumps([records[n] for n in order if n in records], indent=1) + "\n")
        _write_markdown(json.loads((DOCS / "coverage.json").read_text()))


if __name__ == "__main__":
    main()
