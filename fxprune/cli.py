"""The ``fxprune`` command: prune a model to a budget, profile its latency, read a pruned model's report.

    fxprune prune resnet50 --budget 0.5 -o resnet50_half.onnx -o resnet50_half.pt --plot plots/
    fxprune prune mypkg.models:build --weights ckpt.pth --budget flops:0.4 --input-shape 1,3,256,256 -o small.pt
    fxprune profile mobilenet_v2 --engine onnxruntime
    fxprune report resnet50_half.pt

MODEL: a torchvision model name, a timm model name (with timm installed; ``timm:NAME`` to be explicit),
``package.module:factory`` (a callable returning an nn.Module), or a file holding a saved module.
"""

from __future__ import annotations

import argparse
import importlib
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable

import torch

import fxprune
from fxprune import plots
from fxprune.budgets import PHASES, UserBudget
from fxprune.cache import LatencyCache
from fxprune.errors import FxpruneError, InvalidWeightsError, ModelNotFoundError
from fxprune.huggingface import decodes
from fxprune.ir.keys import LATENCY_KEY, LAYER_LATENCY_KEY
from fxprune.passes.context import Context
from fxprune.passes.latency import LatencyPass


def load_model(spec: str, weights: str | None = None) -> torch.nn.Module:
    """The model MODEL names (random weights unless a file or ``weights`` gives them), in eval mode."""
    model = _model_from(spec)
    if weights:
        state = _state_dict(weights)
        try:
            model.load_state_dict(state)
        except RuntimeError as err:  # missing, unexpected or mis-shaped keys
            expected = model.state_dict()
            missing = [k for k in expected if k not in state]
            unexpected = [k for k in state if k not in expected]
            shaped = [k for k in expected if k in state and tuple(state[k].shape) != tuple(expected[k].shape)]
            details = "; ".join(f"{what}: {', '.join(keys[:3])}{' ...' if len(keys) > 3 else ''} ({len(keys)})"
                                for what, keys in (("missing", missing), ("unexpected", unexpected),
                                                   ("other shape", shaped)) if keys)
            raise InvalidWeightsError(f"--weights {weights} does not fit {spec}: {details or str(err)[:200]}. "
                                      "Pass the checkpoint of this model (or the model these weights belong to)."
                                      ) from None
    return model.eval()


def _model_from(spec: str) -> torch.nn.Module:
    path = Path(spec)
    if path.suffix in (".pt", ".pt2", ".pth") and path.exists():
        if path.suffix == ".pt2":
            return fxprune.load(path)
        model = torch.load(path, weights_only=False, map_location="cpu")  # a pickled module: trusted input
        if fxprune.saving.is_saved(model):
            return fxprune.saving.restore(model["module"], model)
        if not isinstance(model, torch.nn.Module):
            raise ModelNotFoundError(f"{spec} holds a {type(model).__name__}, not a module; for a state dict, name "
                                     "the model and pass the file as --weights")
        return model
    if spec.startswith("timm:"):
        return _timm(spec[5:])
    if ":" in spec:
        module_name, _, factory = spec.partition(":")
        if "" not in sys.path and str(Path.cwd()) not in sys.path:  # a factory beside the user, as python -m finds it
            sys.path.insert(0, str(Path.cwd()))
        try:
            return getattr(importlib.import_module(module_name), factory)()
        except (ImportError, AttributeError) as err:
            raise ModelNotFoundError(f"cannot load {spec!r}: {err}. Use package.module:factory, where "
                                     "factory() returns an nn.Module.") from err
    import torchvision

    names = torchvision.models.list_models()
    if spec in names:
        kwargs = {"weights_backbone": None} if spec.startswith(("fcn_", "deeplabv3_", "lraspp_")) else {}
        return torchvision.models.get_model(spec, weights=None, **kwargs)
    try:
        return _timm(spec)
    except ModelNotFoundError:
        close = [n for n in names if n.startswith(spec[:4])][:6]
        raise ModelNotFoundError(f"{spec!r} is not a torchvision model (close: {', '.join(close) or 'none'}), a "
                                 "timm model, package.module:factory or a model file. `fxprune models` lists "
                                 "names.") from None


def _timm(name: str) -> torch.nn.Module:
    try:
        import timm
    except ImportError as err:
        raise ModelNotFoundError(f"{name!r}: timm is not installed (pip install timm)") from err
    if name not in timm.list_models():
        raise ModelNotFoundError(f"{name!r} is not a timm model")
    return timm.create_model(name, pretrained=False)


def _state_dict(path: str) -> dict:
    try:
        state = torch.load(path, weights_only=True, map_location="cpu")
    except Exception as err:  # unpickling errors of many kinds
        raise ModelNotFoundError(f"cannot read weights from {path}: {err}") from err
    for key in ("state_dict", "model", "model_state_dict"):  # common checkpoint layouts
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict):
        raise ModelNotFoundError(f"{path} holds no state dict")
    return {k.removeprefix("module."): v for k, v in state.items()}  # DDP checkpoints


def parse_shape(text: str) -> tuple[int, ...]:
    try:
        shape = tuple(int(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--input-shape must be comma-separated integers, got {text!r}") from None
    if not shape or any(d <= 0 for d in shape):
        raise argparse.ArgumentTypeError(f"--input-shape needs positive sizes, got {text!r}")
    return shape


def parse_budget(text: str) -> UserBudget:
    """``0.5`` (latency share), ``latency:0.5``, ``ms:4.0``, ``flops:0.5``, ``params:0.5``."""
    kind, _, value = text.rpartition(":")
    builders: dict[str, Callable[[float], UserBudget]] = {
        "": fxprune.Latency, "latency": fxprune.Latency, "flops": fxprune.FLOPs, "params": fxprune.Params,
        "ms": lambda v: fxprune.Latency(ms=v)}
    if kind not in builders:
        raise argparse.ArgumentTypeError(f"--budget kind must be latency, ms, flops or params, got {kind!r}")
    try:
        number = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--budget needs a number, got {value!r} (e.g. 0.5 or flops:0.4)") from None
    try:
        return builders[kind](number)
    except FxpruneError as err:
        raise argparse.ArgumentTypeError(str(err)) from err


class Steps:
    """One line per long step, with its time: what the command is doing while it works."""

    def __call__(self, what: str):
        print(f"fxprune: {what} ...", file=sys.stderr, flush=True)
        self.start, self.what = time.perf_counter(), what
        return self

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind, *rest) -> None:
        if kind is None:
            print(f"fxprune: {self.what}: done in {time.perf_counter() - self.start:.1f} s", file=sys.stderr,
                  flush=True)


def _inputs(args, model: torch.nn.Module) -> tuple | dict:
    """The example the model is compiled on: ``--input-shape`` random values (a decoder's: token ids, batch x
    tokens, default 1 x 128), else what image classifiers take."""
    if decodes(model):
        shape = args.input_shape or (1, 128)
        if len(shape) != 2:
            raise FxpruneError(f"--input-shape {','.join(map(str, shape))}: a decoder takes token ids, batch,tokens "
                               "(e.g. 1,128)")
        config: Any = model.config  # a Hugging Face model (decodes)
        return {"input_ids": torch.randint(0, int(config.vocab_size), shape)}
    if args.input_shape:
        dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
        return (torch.randn(*args.input_shape, dtype=dtype),)
    return fxprune.api.infer_example_inputs(model)


def _load(args, step: Steps) -> tuple[torch.nn.Module, tuple | dict]:
    """The model named on the command line (with its weights) and its example inputs. Random weights and
    inputs are seeded: the same command builds the same model, whose plans and their timings the latency
    cache then holds (unseeded, every run of the README's command pruned another model and timed 4 plans
    anew, 35 s where a warm compile takes 4)."""
    torch.manual_seed(0)
    with step(f"loading {args.model}"):
        model = load_model(args.model, args.weights)
    return model, _inputs(args, model)


def _capture(args) -> dict:
    """The capture options of a model command, as compile and analyze take them."""
    return {"capture": args.capture, "leaf_modules": args.leaf_module}


# API words in fxprune's messages, and the flags a command-line user gives instead
_FLAGS = {"capture='export'": "--capture export", "capture='auto'": "--capture auto",
          "leaf_modules=[...]": "--leaf-module NAME", "compile with a larger refine": "give a larger --refine",
          "example_inputs=(tensor, ...)": "--input-shape", "pass measure=True to fxprune.compile": "pass --measure",
          "ask for a little less than the budget": "give a slightly smaller --budget",
          "a smaller round_to": "a smaller --round-to", "keep=": "--keep ",
          "phase='prefill' or 'decode'": "--phase prefill or --phase decode",
          "phase='prefill' to hold it": "--phase prefill to hold it",
          "give it with phase='decode' or 'both'": "give it with --phase decode or --phase both",
          "Latency(tokens=..., batch=...)": "--tokens and --batch", "Latency(phase='decode')": "--phase decode",
          "Latency(phase='both')": "--phase both", "Latency(tokens=...)": "--tokens", "Latency(batch=...)": "--batch",
          "set Latency(..., tokens=N, batch=B)": "give --tokens N and --batch B",
          "give a prefill budget (Latency(0.5)) instead": "leave --phase out",
          "give Latency(fraction) alone": "leave --phase, --tokens and --batch out"}


def _in_flags(message: str) -> str:
    for words, flag in _FLAGS.items():
        message = message.replace(words, flag)
    return message


OUTPUT_SUFFIXES = (".onnx", ".pt", ".pt2")


def check_outputs(args) -> None:
    """What can be known wrong about -o and --plot before minutes of compiling: a suffix no writer takes, a
    folder that can't be written, matplotlib missing."""
    for output in args.output:
        path = Path(output)
        if path.suffix not in OUTPUT_SUFFIXES:
            raise FxpruneError(f"-o {output}: write .onnx (checked ONNX), .pt (fxprune.save) or .pt2 "
                               f"(torch.export), not {path.suffix or 'a file without a suffix'}")
        _check_writable(path.parent, f"-o {output}")
    if getattr(args, "quantize", None) and not any(Path(o).suffix == ".onnx" for o in args.output):
        raise FxpruneError(f"--quantize {args.quantize} quantizes the ONNX file written: add -o NAME.onnx")
    if getattr(args, "plot", None):
        _check_writable(Path(args.plot), f"--plot {args.plot}")
        try:
            import matplotlib  # noqa: F401 - only whether it is there
        except ImportError:
            raise FxpruneError("--plot needs matplotlib: pip install 'fxprune[plot]' (or matplotlib)") from None


def _check_writable(folder: Path, flag: str) -> None:
    """Make the folder (as the writers would) and a file in it, or say why not."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as err:
        raise FxpruneError(f"{flag}: cannot write under {folder} ({err.strerror or err}); choose a folder you "
                           "can write to") from None


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"needs a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"needs a number >= 1, got {value}")
    return value


def phased(budget: UserBudget, phase: str | None, tokens: int | None, batch: int | None) -> UserBudget:
    """``--budget`` with ``--phase``, ``--tokens`` and ``--batch`` (a decoder's latency), checked as Latency checks
    them; a budget of another metric has no phase."""
    given = {name: value for name, value in (("phase", phase), ("tokens", tokens), ("batch", batch)) if value}
    if not given:
        return budget
    if not isinstance(budget, fxprune.Latency):
        raise FxpruneError(f"--{next(iter(given))} sets a latency budget's decoder phase; --budget {budget} has none: "
                           "give --budget 0.5 or ms:N")
    # Latency's own checks, in its words (_in_flags gives the flags)
    return replace(budget, phase=phase or budget.phase, tokens=tokens or budget.tokens, batch=batch or budget.batch)


def cmd_prune(args) -> None:
    check_outputs(args)
    budget = phased(args.budget, args.phase, args.tokens, args.batch)
    step = Steps()
    model, inputs = _load(args, step)
    with step(f"compiling to {budget}"):
        pruned = fxprune.compile(model, budget, inputs, importance=args.importance, solver=args.solver,
                                 engine=args.engine, threads=args.threads, round_to=args.round_to, depth=args.depth,
                                 measure=args.measure, refine=args.refine, remeasure=args.remeasure,
                                 keep=args.keep, **_capture(args))
    report = fxprune.report(pruned)
    print(_in_flags(str(report)))
    for output in args.output:
        with step(f"writing {output}"):
            path = Path(output)
            if path.suffix == ".onnx":
                result = fxprune.export_onnx(pruned, path, inputs, quantize=args.quantize,
                                               dynamic_sizes=args.dynamic_sizes)
                note = f"{result.num_nodes} nodes, onnxruntime max abs diff vs torch {result.max_abs_diff:.1e}"
                if result.quantized:
                    agreement = (f", top-1 agreement {result.int8_top1_agreement:.1%}"
                                 if result.int8_top1_agreement is not None else "")
                    note += f"; INT8: max abs diff vs FP32 {result.int8_max_abs_diff:.2g}{agreement}"
            else:
                fxprune.save(pruned, path, inputs)
                note = "reload with fxprune.load"
        print(f"wrote {path} ({path.stat().st_size / 1e6:.1f} MB, {note})")
    if args.plot:
        folder = Path(args.plot)
        written = [plots.widths(report, folder)]
        if report.predicted_latency_ms_before is not None:  # the tables are in the cache now: no measuring
            written.append(plots.latency_curves(_with_tables(model, inputs, args), folder))
        if report.measured_latency_ms_before is not None and report.predicted_latency_ms_before is not None:
            written.append(plots.predicted_vs_measured(report, folder))
        print("plots: " + ", ".join(str(p) for p in written))


def _with_tables(model: torch.nn.Module, inputs: tuple | dict, args) -> torch.fx.GraphModule:
    """The analysed model with its latency tables (measured, or from the cache) on its nodes."""
    gm = fxprune.analyze(model, inputs, **_capture(args))
    flat = fxprune.graph_inputs(gm, inputs)
    with Context(flat, args.engine, threads=args.threads, remeasure=getattr(args, "remeasure", False)) as context:
        LatencyPass(context, round_to=getattr(args, "round_to", None))(gm)
    return gm


def cmd_profile(args) -> None:
    step = Steps()
    model, inputs = _load(args, step)
    with step(f"latency tables on {args.engine}"):
        gm = _with_tables(model, inputs, args)
    calibration = gm.meta[LATENCY_KEY]
    total = calibration.measured_ms
    print(f"{args.model} on {args.engine} ({calibration.engine['threads']} threads), input "
          f"{'x'.join(map(str, fxprune.graph_inputs(gm, inputs)[0].shape))}: {total:.3f} ms")
    print(f"  {'layer':<32} {'as deployed':<46} {'ms':>8} {'share':>7}")
    rows = []
    for node in gm.graph.nodes:
        latency = node.meta.get(LAYER_LATENCY_KEY)
        if latency is not None:
            full = latency.table.at(latency.unit.spec.in_channels, latency.unit.spec.out_channels)
            rows.append((node.name, latency.unit.spec.describe(), full))
    for name, what, ms in sorted(rows, key=lambda r: -r[2]) if args.sort else rows:
        print(f"  {name:<32} {what:<46} {ms:>8.3f} {ms / total:>7.1%}")
    for what, ms in (("memory-bound ops between layers", calibration.memory_ms),
                     ("between kernels, and frozen layers", calibration.fixed_ms)):
        print(f"  {what:<79} {ms:>8.3f} {ms / total:>7.1%}")
    print(f"{calibration.summary()} ({calibration.seconds:.1f} s)")
    for why in calibration.healed:
        print(f"  timed again: {why}")
    if args.plot:
        print(f"plot: {plots.latency_curves(gm, Path(args.plot))}")


def cmd_report(args) -> None:
    model = fxprune.load(args.file)
    print(fxprune.report(model))


def cmd_analyze(args) -> None:
    model = load_model(args.model, args.weights)
    gm = fxprune.analyze(model, _inputs(args, model), **_capture(args))
    groups = fxprune.groups(gm)
    capture = fxprune.capture_of(gm)
    assert capture is not None  # analyze records how it captured the model
    print(f"{args.model}: {len(groups)} channel groups, {sum(g.prunable for g in groups)} prunable "
          f"({capture.describe()})")
    for group in groups:
        print("  " + group.describe())
    blocks, others = fxprune.blocks(gm)
    print(f"{len(blocks)} removable residual blocks (--depth): " + (", ".join(b.module for b in blocks) or "none"))
    for add, why in others.items():
        print(f"  {add}: not removable: {why}")


def cmd_cache(args) -> None:
    cache = LatencyCache()
    if args.action == "clear":
        print(f"removed {cache.clear(args.kind)} entries from {cache.directory}")
        return
    found = cache.info()
    print(f"latency cache: {cache.directory} (FXPRUNE_CACHE_DIR moves it)")
    if not found:
        print("  empty")
    for kind, entry in found.items():
        newest = time.strftime("%Y-%m-%d %H:%M", time.localtime(entry["newest"]))
        print(f"  {kind:<12} {int(entry['entries']):>6} entries {entry['bytes'] / 1e6:>8.2f} MB   newest {newest}")
    print("fxprune cache clear [--kind KIND] deletes them; `fxprune prune ... --remeasure` times them again")


def cmd_models(args) -> None:
    import torchvision

    print("\n".join(torchvision.models.list_models()))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fxprune", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    def model_command(name: str, func, help_text: str) -> argparse.ArgumentParser:
        cmd = sub.add_parser(name, help=help_text)
        cmd.add_argument("model", help="torchvision or timm name, package.module:factory, or a model file")
        cmd.add_argument("--weights", help="a state dict (checkpoint) to load into the model")
        cmd.add_argument("--input-shape", type=parse_shape, help="example input shape (default: 1,C,224,224)")
        cmd.add_argument("--capture", default="auto", choices=("auto", "fx", "export", "export-strict", "partitioned"),
                         help="how to capture the model: torch.fx, then torch.export, then in parts (auto, the "
                              "default), or one alone")
        cmd.add_argument("--leaf-module", action="append", default=[], metavar="NAME",
                         help="a submodule (qualified name) to keep opaque: its channels are kept (repeatable)")
        cmd.set_defaults(func=func)
        return cmd

    prune = model_command("prune", cmd_prune, "prune a model to a budget, write it, report")
    prune.add_argument("--budget", type=parse_budget, default=fxprune.Latency(0.5),
                       help="0.5 (latency share, the default), ms:4.0, flops:0.5 or params:0.5")
    for cmd in (prune, model_command("profile", cmd_profile, "per-layer latency table on an engine")):
        cmd.add_argument("--engine", default="onnxruntime",
                         choices=("onnxruntime", "onnxruntime-int8", "torch", "cuda"),
                         help="where latency is measured; onnxruntime-int8: the model statically quantized to INT8")
        cmd.add_argument("--threads", type=positive_int, help="engine threads (default: torch's)")
        cmd.add_argument("--plot", metavar="DIR", help="write PNG plots to DIR")
        cmd.add_argument("--remeasure", action="store_true",
                         help="time the latency tables and plans again instead of reading the cache")
    prune.add_argument("--phase", choices=PHASES,
                       help="a Hugging Face decoder's latency: prefill (one forward of the example), decode (one "
                            "token with a key-value cache) or both (the larger share; its default)")
    prune.add_argument("--tokens", type=positive_int, help="--phase decode/both: the cache's length (default: the "
                                                           "example's tokens)")
    prune.add_argument("--batch", type=positive_int, help="--phase decode/both: the batch (default: the example's)")
    prune.add_argument("--importance", default="sp_lamp", choices=("sp_lamp", "lamp", "l1", "l2", "bn_scale"))
    prune.add_argument("--solver", default="sp_lamp", choices=("sp_lamp", "halp"))
    prune.add_argument("--round-to", type=positive_int,
                       help="keep counts on multiples of this (default: the engine's step)")
    prune.add_argument("--measure", action="store_true", help="time the model before and after on the engine")
    prune.add_argument("--depth", action=argparse.BooleanOptionalAction, default=True,
                       help="the plan may also remove whole residual blocks, x + f(x) becoming x (default: on; "
                            "--no-depth: width only)")
    prune.add_argument("--depth-only", action="store_const", const="only", dest="depth",
                       help="whole residual blocks only, every width kept (layer dropping, to the budget)")
    prune.add_argument("--keep", action="append", default=[], metavar="NAME",
                       help="a module whose output channels every plan keeps (a qualified name or a pattern such as "
                            "'model.layers.*.self_attn'; its submodules too); repeat for more")
    prune.add_argument("--refine", type=int, default=4, metavar="N",
                       help="latency budgets: time up to N solved plans on the engine and solve again through "
                            "the measurements (default 4; 0 trusts the tables alone)")
    prune.add_argument("--quantize", choices=("int8",),
                       help="write the .onnx outputs statically quantized (activations calibrated on the example "
                            "input)")
    prune.add_argument("--dynamic-sizes", action="store_true",
                       help="let the .onnx outputs take any image size or sequence length, not only the example's "
                            "(onnxruntime runs such a file a few percent slower)")
    prune.add_argument("-o", "--output", action="append", default=[],
                       help="write the pruned model: .onnx (checked export), .pt (GraphModule) or .pt2 (torch.export)")
    sub.choices["profile"].add_argument("--sort", action="store_true", help="costliest layers first")
    model_command("analyze", cmd_analyze, "list a model's channel groups")
    report = sub.add_parser("report", help="print the report of a model written by `fxprune prune -o X.pt`")
    report.add_argument("file")
    report.set_defaults(func=cmd_report)
    sub.add_parser("models", help="list torchvision model names").set_defaults(func=cmd_models)
    cache = sub.add_parser("cache", help="what the latency cache holds, or clear it")
    cache.add_argument("action", choices=("info", "clear"))
    cache.add_argument("--kind", help="clear only entries of this kind (as `fxprune cache info` lists them)")
    cache.set_defaults(func=cmd_cache)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except FxpruneError as err:
        print(f"fxprune: error: {_in_flags(str(err))}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
