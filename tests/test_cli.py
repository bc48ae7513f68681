"""The fxprune command line: prune to a budget and write every format, profile, report, and mistakes
that end in a message instead of a traceback."""

from __future__ import annotations

import re

import onnx
import pytest
import torch

import fxprune
from fxprune.cli import main

TINY = "fxprune.testing:tiny_cnn"


def test_prune_writes_onnx_and_both_torch_formats_and_reports(tmp_path, capsys):
    outputs = [tmp_path / "small.onnx", tmp_path / "small.pt", tmp_path / "small.pt2"]
    argv = ["prune", "mobilenet_v3_small", "--input-shape", "1,3,64,64", "--budget", "flops:0.5"]
    assert main(argv + [arg for out in outputs for arg in ("-o", str(out))]) == 0
    text = capsys.readouterr().out
    assert "FLOPs(0.5)" in text and text.count("wrote") == 3
    onnx.checker.check_model(str(outputs[0]))
    x = torch.randn(2, 3, 64, 64)
    reloaded = [fxprune.load(outputs[1]), fxprune.load(outputs[2])]
    torch.testing.assert_close(reloaded[0](x), reloaded[1](x))
    assert main(["report", str(outputs[1])]) == 0
    assert "FLOPs(0.5)" in capsys.readouterr().out


def test_prune_to_a_latency_budget_with_weights_and_plots(tmp_path, capsys):
    weights = tmp_path / "ckpt.pth"
    torch.save({"state_dict": fxprune.testing.tiny_cnn().state_dict()}, weights)
    plots = tmp_path / "plots"
    assert main(["prune", TINY, "--weights", str(weights), "--input-shape", "1,3,32,32", "--budget", "0.6",
                 "--threads", "1", "--measure", "--plot", str(plots)]) == 0
    text = capsys.readouterr().out
    assert "latency on onnxruntime" in text and "measured" in text
    # refine=2 by default: a second plan is timed only when the first lands off the aim
    assert re.search(r"\b[12] plan\(s\) timed on the engine while solving", text)
    assert {p.name for p in plots.iterdir()} == {"widths.png", "latency_vs_width.png", "predicted_vs_measured.png"}


def test_refine_zero_trusts_the_tables(capsys):
    assert main(["prune", TINY, "--input-shape", "1,3,32,32", "--budget", "0.6", "--threads", "1",
                 "--refine", "0"]) == 0
    text = capsys.readouterr().out
    assert "predicted (tables)" in text and "timed on the engine" not in text


def test_profile_prints_a_per_layer_table(capsys):
    assert main(["profile", TINY, "--input-shape", "1,3,32,32", "--threads", "1", "--sort"]) == 0
    text = capsys.readouterr().out
    assert "conv3x3 32->64" in text and "latency step" in text and "memory-bound" in text


def test_analyze_lists_groups(capsys):
    assert main(["analyze", "resnet18", "--input-shape", "1,3,32,32"]) == 0
    text = capsys.readouterr().out
    assert "prunable" in text and "frozen: model output" in text


@pytest.mark.parametrize("argv, message", [
    (["prune", "resnet1"], "not a torchvision model"),
    (["prune", "nosuchpackage.module:make"], "cannot load"),
    (["prune", "resnet18", "--input-shape", "1,5,32,32", "--budget", "flops:0.5"], "failed on the example inputs"),
    (["prune", TINY, "--input-shape", "1,3,32,32", "--budget", "flops:0.0001"], "smallest achievable"),
    (["report", "nosuchfile.pt"], "no such file"),
])
def test_mistakes_exit_non_zero_with_a_message(argv, message, capsys):
    assert main(argv) != 0
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("budget", ["1.5", "0", "flops:-1", "speed:0.5", "half"])
def test_malformed_budgets_are_refused_by_the_parser(budget, capsys):
    with pytest.raises(SystemExit):
        main(["prune", TINY, "--budget", budget])
    assert "--budget" in capsys.readouterr().err


def test_a_state_dict_given_as_the_model_is_explained(tmp_path, capsys):
    path = tmp_path / "weights.pth"
    torch.save(fxprune.testing.tiny_cnn().state_dict(), path)
    assert main(["prune", str(path), "--budget", "flops:0.5"]) != 0
    assert "--weights" in capsys.readouterr().err


def test_capture_flags_and_advice_in_flags(capsys):
    spec = "fxprune.testing:split_block"
    assert main(["prune", spec, "--input-shape", "1,3,16,16", "--budget", "flops:0.7"]) == 0
    assert "captured by export" in capsys.readouterr().out
    assert main(["analyze", spec, "--input-shape", "1,3,16,16", "--capture", "fx"]) != 0
    error = capsys.readouterr().err
    assert "--capture export" in error and "capture='export'" not in error and "concrete_args" not in error
    assert main(["analyze", spec, "--input-shape", "1,3,16,16", "--leaf-module", "inner"]) == 0
