"""The examples run: digits (real data from scikit-learn), and the CIFAR-10 and ImageNet recipes on
torchvision's FakeData, alone and under torchrun with two gloo processes."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

import fxprune
from examples.cifar10 import train as cifar10
from examples.digits import accuracy as digits_accuracy
from examples.digits import benchmark as digits_benchmark
from examples.digits.data import digits, jittered
from examples.imagenet import train as imagenet
from examples.models import CifarResNet, resnet20

SMOKE = ["--fake-data", "--fake-size", "32", "--base-epochs", "1", "--epochs", "1", "--batch-size", "16",
         "--workers", "0", "--prune-every", "1", "--prune-steps", "2"]


def test_digits_are_the_bundled_images_upsampled():
    train_set, test_set = digits()
    assert len(train_set) + len(test_set) == 1797
    x, y = train_set[0]
    assert x.shape == (1, 32, 32) and 0 <= int(y) < 10
    assert set(int(label) for _, label in test_set) == set(range(10))  # stratified: every class in the test split


def test_the_digits_benchmark_quantizes_each_model_alike_and_scores_it_in_onnxruntime():
    args = digits_benchmark.argparse.Namespace(engine="onnxruntime-int8", cache=None)
    bench = digits_benchmark.Bench(args)
    torch.manual_seed(0)
    model = resnet20(in_channels=1, width=32).eval()
    int8_accuracy, agreement = bench.int8_accuracy(model)
    labels = bench.test_set.tensors[1]
    with torch.no_grad():
        fp32 = (model(bench.test_set.tensors[0]).argmax(1) == labels).float().mean().item()
    assert 0.0 <= int8_accuracy <= 1.0 and 0.5 < agreement <= 1.0  # an untrained model: INT8 mostly agrees
    assert abs(int8_accuracy - fp32) <= 1 - agreement + 1e-9  # accuracies differ only where predictions do


def test_the_digits_int8_summary_compares_int8_accuracy_per_seed(tmp_path):
    rows = [{"seed": seed, "method": method, "budget": 0.5, "base_accuracy": 0.97, "base_int8_accuracy": 0.96,
             "accuracy": 0.9, "int8_accuracy": 0.9 - 0.01 * seed - (0.05 if method.startswith("torch") else 0),
             "int8_agreement": 0.99, "latency_share": 0.5, "flops_share": 0.4}
            for seed in range(2) for method in ("fxprune sp_lamp", "torch-pruning magnitude")]
    args = digits_benchmark.argparse.Namespace(engine="onnxruntime-int8", docs=str(tmp_path), seeds=2, budgets=[0.5],
                                               methods=["fxprune sp_lamp", "torch-pruning magnitude"],
                                               base_epochs=20, epochs=6)
    digits_benchmark.summarize(rows, args)
    text = (tmp_path / "digits_int8.md").read_text()
    assert "at INT8 onnxruntime latency budgets" in text and "--engine onnxruntime-int8" in text
    assert "quantized to INT8 0.960" in text and "INT8 test accuracy after pruning" in text
    assert "| +0.050 | +0.050, +0.050 |" in text  # mean and per-seed paired differences of INT8 accuracy
    assert (tmp_path / "digits_int8.png").exists() and not (tmp_path / "digits.md").exists()


def test_jittered_digits_move_every_image_once_by_a_seeded_transform():
    train_set, _ = digits()
    state = torch.random.get_rng_state()
    moved, again = jittered(train_set, seed=3), jittered(train_set, seed=3)
    assert torch.equal(torch.random.get_rng_state(), state)  # the caller's random stream is left as it was
    assert torch.equal(moved.tensors[0], again.tensors[0]) and torch.equal(moved.tensors[1], train_set.tensors[1])
    changed = (moved.tensors[0] - train_set.tensors[0]).flatten(1).abs().amax(1) > 1e-3
    assert changed.float().mean() > 0.95 and not torch.equal(jittered(train_set, seed=4).tensors[0], moved.tensors[0])


def test_the_accuracy_benchmark_scores_every_kind_of_method_at_its_points(tmp_path):
    methods = ["fxprune sp_lamp", "fxprune taylor + halp solver", "fxprune halp schedule", "fxprune ssr", "uniform"]
    rows = digits_accuracy.main(["--seeds", "1", "--budgets", "0.7", "--methods", *methods, "--depth", "8",
                                 "--width", "32", "--size", "16", "--base-epochs", "2", "--short-epochs", "1",
                                 "--epochs", "2", "--search-steps", "3", "--out", str(tmp_path / "out"),
                                 "--cache", str(tmp_path / "cache"), "--docs", str(tmp_path / "docs")])
    assert [row["method"] for row in rows] == methods
    for row in rows:
        assert "unreachable" not in row, row
        assert row["latency_share"] > 0 and 0 < row["params_share"] < 1  # timed (its value is the benchmark's)
        assert ("one-shot" in row) == (row["method"] not in ("fxprune halp schedule", "fxprune ssr"))
        for point in ("short", "full"):
            assert 0 <= row[point]["accuracy"] <= 1 and 0 <= row[point]["agreement"] <= 1 and row[point]["kl"] >= 0
    text = (tmp_path / "docs" / "accuracy.md").read_text()
    assert "--depth 8 --size 16 --base-epochs 2" in text and (tmp_path / "docs" / "accuracy.png").exists()
    again = digits_accuracy.main(["--seeds", "1", "--budgets", "0.7", "--methods", *methods, "--depth", "8",
                                  "--width", "32", "--size", "16", "--base-epochs", "2", "--short-epochs", "1",
                                  "--epochs", "2", "--out", str(tmp_path / "out"), "--docs", str(tmp_path / "docs")])
    assert again == rows  # resumed from the results file: nothing run twice


def test_the_accuracy_report_says_which_rows_came_from_which_run(tmp_path):
    point = {"accuracy": 0.9, "agreement": 0.9, "kl": 0.1}
    rows = [{"seed": 0, "method": method, "budget": budget, "base_accuracy": 0.96, "latency_share": budget,
             "params_share": 0.2, "short": point, "full": point, "one-shot": point, **run}
            for method, budget, run in (("uniform", 0.3, {}), ("fxprune sp_lamp", 0.3, {}),
                                        ("fxprune sp_lamp", 0.2, {"run": "2026-12-03 at abc1234"}))]
    args = digits_accuracy.argparse.Namespace(**digits_accuracy.DEFAULTS, docs=str(tmp_path), again=True)
    text = digits_accuracy.summarize(rows, args)
    assert "--again" in text and "Rows come from more than one run" in text
    assert "- 2026-12-03 at abc1234: 1 rows; budgets 0.2; 1 methods (fxprune sp_lamp)" in text
    assert ("- an earlier run (before rows recorded theirs): 2 rows; budgets 0.3; 2 methods "
            "(fxprune sp_lamp, uniform)") in text
    assert "more than one run" not in digits_accuracy.summarize(rows[:2], args)


def test_the_accuracy_summary_says_which_differences_exceed_the_seeds_spread(tmp_path):
    def row(seed, method, accuracy):
        point = {"accuracy": accuracy, "agreement": 0.9, "kl": 0.1}
        one_shot = {} if method == "fxprune halp schedule" else {"one-shot": point}
        return {"seed": seed, "method": method, "budget": 0.3, "base_accuracy": 0.96, "latency_share": 0.3,
                "params_share": 0.2, "short": point, "full": point, **one_shot}
    noise = [0.001, -0.002, 0.0]
    default, width_only = digits_accuracy.DEFAULT, digits_accuracy.WIDTH_ONLY  # depth + width; width only
    rows = [row(seed, default, 0.90 + noise[seed]) for seed in range(3)]
    rows += [row(seed, width_only, 0.87 + noise[seed] / 2) for seed in range(3)]
    rows += [row(seed, "torch-pruning lamp", 0.85 - noise[seed]) for seed in range(3)]  # behind, consistently
    rows += [row(seed, "torch-pruning magnitude", 0.80) for seed in range(3)]
    rows += [row(seed, "uniform", 0.90 + (0.05 if seed == 0 else -0.04)) for seed in range(3)]  # level, noisy
    rows += [row(seed, "fxprune halp schedule", 0.88) for seed in range(3)]
    rows.append({"seed": 0, "method": "fxprune ssr", "budget": 0.3, "base_accuracy": 0.96,
                 "unreachable": "the latency budget 0.300 of the model (1.2 ms) cannot be met: the smallest achievable "
                                "is 0.410 of the model (1.64 ms)", "smallest_share": 0.41})
    rows.append({"seed": 1, "method": "fxprune ssr", "budget": 0.3, "base_accuracy": 0.96,
                 "unreachable": "the latency budget 0.300 of the model (1.2 ms) cannot be met: the smallest achievable "
                                "is 0.430 of the model (1.72 ms)", "smallest_share": 0.43})
    rows += [{"seed": seed, "method": default, "budget": 0.2, "base_accuracy": 0.96,
              "unreachable": f"the latency budget 0.200 of the model (0.8 ms) cannot be met: the smallest achievable "
                             f"is 0.2{6 + seed} of the model (1.1 ms)", "smallest_share": 0.26 + 0.01 * seed}
             for seed in range(3)]
    rows += [{**row(seed, "torch-pruning lamp", 0.5), "budget": 0.2} for seed in range(3)]
    args = digits_accuracy.argparse.Namespace(**digits_accuracy.DEFAULTS, docs=str(tmp_path))
    args.seeds = 3
    text = digits_accuracy.summarize(rows, args)
    assert "`python -m examples.digits.accuracy --seeds 3`" in text
    assert "| 0.3 | one-shot | 0.900 | torch-pruning lamp: 0.850 | +0.049 | +0.052, +0.046, +0.050 | yes |" in text
    assert f"| 0.3 | one-shot | {default} (0.900) | 0.800-0.900 |" in text
    assert "3 of 4: fxprune sp_lamp, torch-pruning magnitude, torch-pruning lamp |" in text  # uniform: level
    assert ("| 0.3 | full | 0.900 | 0.870 | +0.030 | +0.031, +0.029, +0.030 | yes | torch-pruning lamp: 0.850 | "
            "+0.049 | yes |") in text  # depth + width against width only
    assert "| fxprune halp schedule |  | — |" in text  # no one-shot point for a schedule (not run at 0.2)
    assert ("| 0.2 | all | unreachable on 3 of 3 seeds (smallest plan 0.260-0.280 of the model (fxprune's tables or "
            "timing)) | one-shot 0.500, short 0.500, full 0.500 |") in text
    assert f"| {default} | unreachable | 0.900 ± 0.002 |" in text
    assert "| fxprune ssr | 0.3 | 0, 1 | smallest plan 0.410-0.430 of the model (fxprune's tables or timing) |" in text
    assert (tmp_path / "accuracy.png").exists() and json.loads((tmp_path / "accuracy.json").read_text()) == rows


def test_cifar_resnets_have_the_papers_depths():
    def convs(m):
        return sum(isinstance(x, torch.nn.Conv2d) and x.kernel_size == (3, 3) for x in m.modules())
    assert convs(resnet20()) == 19 and convs(CifarResNet(56)) == 55
    with pytest.raises(ValueError, match="6n"):
        CifarResNet(21)


@pytest.mark.parametrize("method", ["sp_lamp", "halp", "ssr"])
def test_the_cifar10_recipe_prunes_fine_tunes_and_exports(tmp_path, method):
    figures = cifar10.main(SMOKE + ["--model", "resnet20", "--method", method, "--metric", "flops", "--budget", "0.5",
                                    "--out", str(tmp_path)])
    assert figures["params_after"] < figures["params_before"]
    assert 0.0 <= figures["accuracy"] <= 1.0
    pruned = torch.load(tmp_path / "pruned.pt", weights_only=False)
    assert pruned(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    assert (tmp_path / "pruned.onnx").stat().st_size > 0


def test_the_imagenet_recipe_runs_on_fake_data(tmp_path):
    figures = imagenet.main(SMOKE + ["--model", "resnet18", "--image-size", "32", "--method", "sp_lamp",
                                     "--metric", "params", "--budget", "0.6", "--out", str(tmp_path)])
    assert figures["params_after"] <= 0.6 * figures["params_before"]


def test_the_cifar10_recipe_runs_under_torchrun_with_two_processes(tmp_path):
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               "-m", "examples.cifar10.train", *SMOKE, "--model", "resnet20", "--method", "halp",
               "--metric", "flops", "--budget", "0.5", "--out", str(tmp_path)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    assert "'method': 'halp'" in done.stdout and (tmp_path / "pruned.onnx").exists()


def _coco_folder(root, images: int = 4) -> None:
    """A COCO-format folder of generated images, each with two boxes of two classes."""
    from PIL import Image

    generator = torch.Generator().manual_seed(0)
    coco = {"images": [], "annotations": [], "categories": [{"id": 1}, {"id": 2}]}
    for index in range(images):
        pixels = (torch.rand(3, 96, 128, generator=generator) * 255).byte().permute(1, 2, 0).numpy()
        Image.fromarray(pixels).save(root / f"{index}.png")
        coco["images"].append({"id": index, "file_name": f"{index}.png", "width": 128, "height": 96})
        for box, label in (([10, 12, 40, 30], 1), ([60, 40, 50, 44], 2)):
            coco["annotations"].append({"id": len(coco["annotations"]), "image_id": index, "bbox": box,
                                        "category_id": label})
    (root / "annotations.json").write_text(json.dumps(coco))


def test_the_detection_recipe_prunes_a_whole_detector_while_it_fine_tunes(tmp_path):
    from examples.detection import train as detection

    _coco_folder(tmp_path)
    figures = detection.main(["--data", str(tmp_path), "--epochs", "1", "--steps", "2", "--every", "1",
                              "--budget", "0.6", "--size", "128", "-o", str(tmp_path / "det.pt"),
                              "--onnx", str(tmp_path / "det.onnx")])
    assert figures["iterations"] == 2 and figures["flops_after"] <= 0.6 * figures["flops_before"] + 1
    assert figures["params_after"] < figures["params_before"]
    assert figures["onnx_max_abs_diff"] < 1e-3
    loaded = fxprune.load(tmp_path / "det.pt")
    with torch.no_grad():
        out = loaded.eval()([torch.rand(3, 96, 128)])
    assert set(out[0]) == {"boxes", "labels", "scores"}


def test_a_training_set_smaller_than_a_batch_is_one_batch():
    """The CIFAR-10 recipe's documented smoke test (--fake-size 64 at the default --batch-size 128) had no
    iteration at all: the loader dropped its only, incomplete batch."""
    from examples.training import loader

    data = torch.utils.data.TensorDataset(torch.randn(8, 3), torch.zeros(8))
    assert len(loader(data, 16, train=True)) == 1
    assert len(loader(torch.utils.data.TensorDataset(torch.randn(40, 3)), 16, train=True)) == 2  # full batches only
