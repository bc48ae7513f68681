"""The fxprune command line."""

from __future__ import annotations

import onnx
import pytest

from fxprune.cli import main


def test_prune_writes_a_verified_onnx_file(tmp_path, capsys):
    out = tmp_path / "small.onnx"
    assert main(["prune", "mobilenet_v3_small", "--input-shape", "1,3,64,64", "--keep", "0.5",
                 "-o", str(out)]) == 0
    text = capsys.readouterr().out
    assert "parameters:" in text and "wrote" in text
    onnx.checker.check_model(str(out))


def test_analyze_lists_groups(capsys):
    assert main(["analyze", "resnet18", "--input-shape", "1,3,32,32"]) == 0
    text = capsys.readouterr().out
    assert "prunable" in text and "frozen: model output" in text


@pytest.mark.parametrize("argv, message", [
    (["prune", "resnet1"], "not a torchvision model"),
    (["prune", "resnet18", "--keep", "0"], "--keep must be in (0, 1]"),
    (["prune", "nosuchpackage.module:make"], "cannot load"),
    (["prune", "resnet18", "--input-shape", "1,5,32,32"], "failed on the example inputs"),
])
def test_mistakes_exit_non_zero_with_a_message(argv, message, capsys):
    assert main(argv) != 0
    assert message in capsys.readouterr().err
