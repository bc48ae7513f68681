"""The fxprune command line: prune to a budget and write every format, profile, report, and mistakes
that end in a message instead of a traceback."""

from __future__ import annotations

import re

import onnx
import pytest
import torch
import torchvision

import fxprune
from fxprune.cli import Steps, _load, build_parser, main
from tests.doubles import tiny_cnn

TINY = "tests.doubles:tiny_cnn"
LLAMA = "tests.doubles:tiny_llama"


def test_prune_writes_onnx_and_both_torch_formats_and_reports(tmp_path, capsys):
    outputs = [tmp_path / "small.onnx", tmp_path / "small.pt", tmp_path / "small.pt2"]
    argv = ["prune", "mobilenet_v3_small", "--input-shape", "1,3,64,64", "--budget", "flops:0.5"]
    assert main(argv + [arg for out in outputs for arg in ("-o", str(out))]) == 0
    text = capsys.readouterr().out
    assert "FLOPs(0.5)" in text and text.count("wrote") == 3
    onnx.checker.check_model(str(outputs[0]))
    assert [d.dim_value for d in onnx.load(str(outputs[0])).graph.input[0].type.tensor_type.shape.dim[2:]] == [64, 64]
    x = torch.randn(2, 3, 64, 64)
    reloaded = [fxprune.load(outputs[1]), fxprune.load(outputs[2])]
    assert type(reloaded[0]) is torchvision.models.MobileNetV3  # -o x.pt writes the model's own class
    torch.testing.assert_close(reloaded[0](x), reloaded[1](x))
    assert main(["report", str(outputs[1])]) == 0
    assert "FLOPs(0.5)" in capsys.readouterr().out


def test_prune_to_a_latency_budget_with_weights_and_plots(tmp_path, capsys):
    weights = tmp_path / "ckpt.pth"
    torch.save({"state_dict": tiny_cnn().state_dict()}, weights)
    plots = tmp_path / "plots"
    assert main(["prune", TINY, "--weights", str(weights), "--input-shape", "1,3,32,32", "--budget", "0.6",
                 "--threads", "1", "--measure", "--plot", str(plots)]) == 0
    text = capsys.readouterr().out
    assert "latency on onnxruntime" in text and "measured" in text
    # refine=4 by default: a further plan is timed only while the last one lands off the aim
    assert re.search(r"\b[1-4] plans? timed while solving", text) and "budget  " in text
    assert "prediction error" in text and " in ms" not in text
    assert {p.name for p in plots.iterdir()} == {"widths.png", "latency_vs_width.png", "predicted_vs_measured.png"}


def test_dynamic_sizes_flag_writes_an_onnx_file_of_any_image_size(tmp_path):
    out = tmp_path / "any.onnx"
    assert main(["prune", TINY, "--input-shape", "1,3,32,32", "--budget", "flops:0.5", "--dynamic-sizes",
                 "-o", str(out)]) == 0
    dims = onnx.load(str(out)).graph.input[0].type.tensor_type.shape.dim
    assert all(d.dim_param for d in (dims[0], dims[2], dims[3]))


def test_a_model_named_without_weights_is_built_alike_on_every_run():
    """So a repeated command prunes the same model: its plans' timings are in the latency cache."""
    args = build_parser().parse_args(["prune", TINY, "--input-shape", "1,3,8,8"])
    (first, x1), (second, x2) = _load(args, Steps()), _load(args, Steps())
    assert torch.equal(x1[0], x2[0])
    for (name, a), b in zip(first.state_dict().items(), second.state_dict().values()):
        assert torch.equal(a, b), name


def test_refine_zero_trusts_the_tables(capsys):
    assert main(["prune", TINY, "--input-shape", "1,3,32,32", "--budget", "0.6", "--threads", "1",
                 "--refine", "0"]) == 0
    text = capsys.readouterr().out
    assert "tables' prediction" in text and "closed loop" not in text


def test_profile_prints_a_per_layer_table(capsys):
    assert main(["profile", TINY, "--input-shape", "1,3,32,32", "--threads", "1", "--sort"]) == 0
    text = capsys.readouterr().out
    assert "conv3x3 32->64" in text and "latency step" in text and "memory-bound" in text


def test_analyze_lists_groups(capsys):
    assert main(["analyze", "resnet18", "--input-shape", "1,3,48,48"]) == 0
    text = capsys.readouterr().out
    assert "prunable" in text and "frozen: model output" in text
    assert "5 removable residual blocks (--depth): layer1.0, layer1.1, layer2.1, layer3.1, layer4.1" in text
    assert "not removable: its other input does not read the skip input" in text  # downsample


@pytest.mark.parametrize("argv, message", [
    (["prune", "resnet1"], "not a torchvision model"),
    (["prune", "nosuchpackage.module:make"], "cannot load"),
    (["prune", "resnet18", "--input-shape", "1,5,32,32", "--budget", "flops:0.5"], "failed on the example inputs"),
    (["prune", TINY, "--input-shape", "1,3,32,32", "--budget", "flops:0.0001"], "smallest achievable"),
    (["prune", TINY, "--input-shape", "1,3,32,32", "--budget", "flops:0.0001"], "a smaller --round-to (now 8)"),
    (["report", "nosuchfile.pt"], "no such file"),
    (["prune", TINY, "--input-shape", "1,3,32,32", "--budget", "0.5", "--phase", "decode"], "leave --phase out"),
    (["prune", TINY, "--budget", "flops:0.5", "--phase", "decode"], "--budget FLOPs(0.5) has none"),
    (["prune", LLAMA, "--budget", "0.5", "--phase", "prefill", "--tokens", "8"],
     "--tokens sets the decode step: give it with --phase decode or --phase both"),
    (["prune", LLAMA, "--budget", "ms:0.1"], "give --phase prefill or --phase decode"),
    (["prune", LLAMA, "--input-shape", "1,3,32,32", "--budget", "flops:0.5"], "a decoder takes token ids"),
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
    torch.save(tiny_cnn().state_dict(), path)
    assert main(["prune", str(path), "--budget", "flops:0.5"]) != 0
    assert "--weights" in capsys.readouterr().err


def test_capture_flags_and_advice_in_flags(capsys):
    spec = "tests.doubles:split_block"
    assert main(["prune", spec, "--input-shape", "1,3,16,16", "--budget", "flops:0.7"]) == 0
    assert "captured by export" in capsys.readouterr().out
    assert main(["analyze", spec, "--input-shape", "1,3,16,16", "--capture", "fx"]) != 0
    error = capsys.readouterr().err
    assert "--capture export" in error and "capture='export'" not in error and "concrete_args" not in error
    assert main(["analyze", spec, "--input-shape", "1,3,16,16", "--leaf-module", "inner"]) == 0


@pytest.mark.parametrize("argv, message", [
    (["-o", "small.txt"], "write .onnx"),
    (["-o", "/proc/fxprune/x.onnx"], "cannot write under /proc"),
    (["--plot", "/proc/fxprune"], "cannot write under /proc"),
])
def test_outputs_are_checked_before_the_compile(argv, message, capsys, monkeypatch):
    monkeypatch.setattr(fxprune, "compile", lambda *a, **k: pytest.fail("compiled before checking the outputs"))
    assert main(["prune", "resnet18", "--budget", "flops:0.5", *argv]) == 1
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_weights_that_do_not_fit_are_a_message(tmp_path, capsys):
    torch.save(torch.nn.Linear(3, 4).state_dict(), tmp_path / "other.pth")
    assert main(["analyze", "resnet18", "--weights", str(tmp_path / "other.pth")]) == 1
    err = capsys.readouterr().err
    assert "does not fit resnet18" in err and "missing" in err and "Traceback" not in err


def test_a_wrong_input_shape_prints_one_message(capsys):
    assert main(["analyze", "resnet18", "--input-shape", "1,5,32,32"]) == 1
    err = capsys.readouterr().err
    assert "failed on the example inputs" in err and "Traceback" not in err


@pytest.mark.parametrize("flag", ["--round-to", "--threads"])
def test_counts_below_one_are_refused(flag, capsys):
    with pytest.raises(SystemExit):
        main(["prune", "resnet18", flag, "0"])
    assert "needs a number >= 1" in capsys.readouterr().err


def test_a_factory_in_the_current_folder_is_found(tmp_path, capsys, monkeypatch):
    (tmp_path / "mymodels_fxprune_test.py").write_text(
        "import torch.nn as nn\ndef mlp():\n"
        "    return nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 4, 1))\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("sys.path", [p for p in __import__("sys").path if p not in ("", str(tmp_path))])
    assert main(["analyze", "mymodels_fxprune_test:mlp", "--input-shape", "1,3,16,16"]) == 0
    assert "channel groups" in capsys.readouterr().out


def test_cache_info_and_clear(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("FXPRUNE_CACHE_DIR", str(tmp_path))
    fxprune.LatencyCache(tmp_path).store({"kind": "table", "layer": 1}, [0.5], lambda v: v)
    assert main(["cache", "info"]) == 0
    out = capsys.readouterr().out
    assert str(tmp_path) in out and re.search(r"table\s+1 entries", out)
    assert main(["cache", "clear"]) == 0
    assert "removed 1 entries" in capsys.readouterr().out
    assert main(["cache", "info"]) == 0 and "empty" in capsys.readouterr().out


def test_the_report_speaks_in_flags(tmp_path, capsys, monkeypatch):
    (tmp_path / "tiny_fxprune_test.py").write_text(
        "import torch.nn as nn\ndef net():\n"
        "    return nn.Sequential(nn.Conv2d(3, 128, 3), nn.ReLU(), nn.Conv2d(128, 128, 3), nn.ReLU(), "
        "nn.Conv2d(128, 8, 1))\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("FXPRUNE_CACHE_DIR", str(tmp_path / "cache"))
    assert main(["prune", "tiny_fxprune_test:net", "--budget", "0.9", "--engine", "torch", "--refine", "0",
                 "--input-shape", "1,3,48,48"]) == 0
    out = capsys.readouterr().out
    assert "pass --measure" in out and "measure=True" not in out


def test_depth_lets_the_plan_remove_residual_blocks_and_the_report_lists_them(tmp_path, capsys):
    output = tmp_path / "small.pt"
    assert main(["prune", "resnet18", "--input-shape", "1,3,32,32", "--budget", "flops:0.15", "--round-to", "64",
                 "--depth", "-o", str(output)]) == 0
    printed = capsys.readouterr().out
    assert "depth:" in printed and "removable residual blocks removed" in printed
    assert "blocks removed (" in printed


def test_keep_takes_modules_out_of_the_plan_and_a_wrong_name_is_said_in_flags(tmp_path, capsys):
    output = tmp_path / "small.pt"
    assert main(["prune", "tests.doubles:tiny_cnn", "--input-shape", "1,3,16,16", "--budget", "flops:0.6",
                 "--keep", "3", "-o", str(output)]) == 0
    assert fxprune.load(output).get_submodule("3").out_channels == 64
    assert main(["prune", "tests.doubles:tiny_cnn", "--input-shape", "1,3,16,16", "--budget", "flops:0.6",
                 "--keep", "features.0"]) == 1
    error = capsys.readouterr().err
    assert "--keep ['features.0'] names no module" in error and "keep=" not in error


def test_a_decoder_prunes_to_its_decode_step_from_the_command_line(capsys):
    pytest.importorskip("transformers")
    assert main(["prune", LLAMA, "--input-shape", "1,16", "--budget", "0.6", "--phase", "decode", "--tokens", "32",
                 "--engine", "torch", "--refine", "0"]) == 0
    text = capsys.readouterr().out
    assert "budget Latency(0.6, phase='decode', tokens=32)" in text and "returned: LlamaForCausalLM" in text
