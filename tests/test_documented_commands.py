"""Every command the README and the examples' docstrings document runs as written, from a fresh folder
that sees the repository's examples (outputs land there, not in the checkout). A command that needs a
dataset or hardware a test machine lacks is listed in COVERED_ELSEWHERE with what runs instead; a newly
documented command that is neither run here nor listed fails the inventory test. The README stays short
(README_LINES, STATUS_CELL_CHARS: figures live in docs/) and its links, and the docs pages', resolve."""

from __future__ import annotations

import ast
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torchvision

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
README_LINES = 150  # the README at most; figures go in docs/, linked from the Status table
STATUS_CELL_CHARS = 200  # a Status table cell at most: a short claim and a link to the docs page with the figures

# documented commands a test machine cannot run as written, and what runs in their place
COVERED_ELSEWHERE = {
    "python -m pytest -n 2 -q": ".ci/run (CI) runs it",
    "python -m examples.cifar10.train --data ~/datasets/cifar10 --method halp --budget 0.7":
        "needs CIFAR-10 on disk: its --fake-data smoke command runs here; every method in test_examples.py",
    "torchrun --nproc_per_node 4 -m examples.cifar10.train --data ~/datasets/cifar10 --method ssr":
        "needs CIFAR-10 on disk: test_examples.py runs the recipe under torchrun with two processes on fake data",
    "python -m examples.imagenet.train --data ~/datasets/imagenet --checkpoint resnet50.pth --method halp":
        "needs ImageNet and a checkpoint: its --fake-data smoke command runs here",
    "torchrun --nproc_per_node 8 -m examples.imagenet.train --data ~/datasets/imagenet --checkpoint r50.pth":
        "needs ImageNet and 8 processes: test_examples.py runs the CIFAR-10 recipe under torchrun with two",
    "python -m examples.detection.train --data ~/datasets/mycoco --budget 0.6 --epochs 12 -o detector.pt":
        "needs a COCO-format folder: test_examples.py generates one and runs the recipe on it",
    "python -m examples.detection.train --data ~/datasets/mycoco --weights fasterrcnn.pth --onnx detector.onnx":
        "needs a COCO-format folder and weights: test_examples.py runs the recipe with --onnx on generated data",
    "python -m examples.yolo.train --data coco8.yaml --model yolov8n.pt --budget 0.5 --epochs 30 -o yolo_pruned.pt":
        "needs a dataset and a checkpoint on disk: its --demo command runs the recipe here on generated images",
    "python -m examples.digits.benchmark":
        "the published benchmark (hours on 2 cores); its quick look runs here",
    "python -m examples.digits.benchmark --engine onnxruntime-int8":
        "the published INT8 benchmark (an hour on 2 cores); test_examples.py runs its INT8 scoring and summary",
    "python -m examples.digits.accuracy":
        "the accuracy benchmark (hours on 2 cores); test_examples.py runs each kind of method and its summary",
    'python -m examples.digits.accuracy --seeds 1 --budgets 0.5 --methods "fxprune sp_lamp" uniform --base-epochs 3 '
    "--docs out/quick":
        "test_examples.py runs the same two kinds of method (and three more) on a smaller model, and resumes it",
    "python -m examples.digits.benchmark --seeds 1 --budgets 0.5 --epochs 2 --docs out/quick":
        "needs Torch-Pruning (pip install -e '.[benchmarks]'); here: it stops at once saying so where that is "
        "missing, and runs where it is installed",
}


def readme_commands() -> list[str]:
    """The commands of the README's bash blocks, without the install that leads the first two (what
    .ci/run does) and the virtual environment's path."""
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", (ROOT / "README.md").read_text(), re.S):
        for line in block.splitlines():
            line = re.sub(r"\s+#.*$", "", line).strip().split(" && ")[-1]
            if line:
                commands.append(line.removeprefix(".venv/bin/"))
    return commands


def example_commands() -> list[str]:
    """The commands in the docstrings of the examples' modules."""
    commands = []
    for path in sorted((ROOT / "examples").rglob("*.py")):
        docstring = ast.get_docstring(ast.parse(path.read_text())) or ""
        for line in docstring.splitlines():
            line = re.sub(r"\s+#.*$", "", line).strip()
            if line.startswith(("python ", "torchrun ")):
                commands.append(line)
    return commands


def run(command: str, cwd: Path, timeout: int = 900) -> subprocess.CompletedProcess:
    """``command`` as a user types it in ``cwd``: ``python`` and ``fxprune`` are this environment's."""
    words = shlex.split(command)
    program = {"python": sys.executable, "fxprune": str(BIN / "fxprune")}.get(words[0], words[0])
    env = {**os.environ, "MPLBACKEND": "Agg"}
    return subprocess.run([program, *words[1:]], cwd=cwd, capture_output=True, text=True, timeout=timeout, env=env)


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    """A fresh folder that sees the repository's examples as a user's checkout does."""
    (tmp_path / "examples").symlink_to(ROOT / "examples")
    return tmp_path


def _ok(done: subprocess.CompletedProcess) -> str:
    assert done.returncode == 0, f"rc {done.returncode}\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    assert "Traceback" not in done.stderr, done.stderr[-3000:]
    return done.stdout


RUN_HERE = [
    "fxprune prune resnet18 --budget 0.5 --measure -o resnet18_half.onnx",
    "fxprune prune resnet18 --budget 0.5 -o small.onnx -o small.pt --measure --plot plots/",
    "fxprune prune mypkg.models:build --weights ckpt.pth --budget flops:0.4 --input-shape 1,3,256,256 -o small.pt2",
    "fxprune profile resnet18 --sort",
    "fxprune report small.pt",
    "fxprune cache info",
    "python -m examples.cifar10.train --fake-data --base-epochs 1 --epochs 1",
    "python -m examples.imagenet.train --fake-data --model resnet18 --image-size 64 --base-epochs 1 --epochs 1",
    "python examples/prune_and_export.py mobilenet_v3_large --keep 0.6",
    "python -m examples.yolo.train --demo -o yolo_pruned.pt",
]


def test_every_documented_command_runs_here_or_is_covered_elsewhere():
    documented = readme_commands() + example_commands()
    assert len(documented) == len(set(documented))
    assert set(documented) == set(RUN_HERE) | set(COVERED_ELSEWHERE), (
        "a documented command is neither run by tests/test_documented_commands.py nor listed in COVERED_ELSEWHERE: "
        f"{sorted(set(documented) ^ (set(RUN_HERE) | set(COVERED_ELSEWHERE)))}")


def _share(text: str, row: str) -> float:
    return float(re.search(rf"^\s+{re.escape(row)}\s+([0-9.]+)", text, re.M).group(1))


def test_the_readmes_first_command(folder):
    text = _ok(run(RUN_HERE[0], folder))
    assert (folder / "resnet18_half.onnx").stat().st_size > 0
    budget, measured = _share(text, "budget"), _share(text, "measured after compiling")
    assert budget == 0.5
    assert ("over the budget" in text) == (measured > budget)  # a note only when the measured share is over it
    assert " in ms" not in text and "raise the budget" not in text


def test_the_readmes_command_line_block(folder):
    text = _ok(run(RUN_HERE[1], folder))
    assert {p.name for p in (folder / "plots").iterdir()} >= {"widths.png", "latency_vs_width.png"}
    assert "measured after compiling" in text and (folder / "small.onnx").exists()
    (folder / "mypkg").mkdir()  # the user's package in the folder they run from, and its checkpoint
    (folder / "mypkg" / "__init__.py").write_text("")
    (folder / "mypkg" / "models.py").write_text(
        "import torchvision\n\n\ndef build():\n    return torchvision.models.resnet18(num_classes=10)\n")
    torch.save(torchvision.models.resnet18(num_classes=10).state_dict(), folder / "ckpt.pth")
    _ok(run(RUN_HERE[2], folder))
    assert (folder / "small.pt2").stat().st_size > 0
    profile = _ok(run(RUN_HERE[3], folder))
    assert "layer4_1_conv2" in profile and "latency step" in profile
    report = _ok(run(RUN_HERE[4], folder))
    assert "budget Latency(0.5)" in report and "measured after compiling" in report
    info = _ok(run(RUN_HERE[5], folder))
    assert "table" in info


@pytest.mark.parametrize("command", RUN_HERE[6:], ids=["cifar10-smoke", "imagenet-smoke", "prune-and-export",
                                                      "yolo-demo"])
def test_the_examples_commands(folder, command):
    done = run(command, folder)
    text = _ok(done)
    assert "Warning: This DataLoader will create" not in done.stderr  # --workers fits the machine
    if "yolo" in command:  # pruned, saved as ultralytics' checkpoint, trained by ultralytics, exported
        assert "map50" in text and (folder / "yolo_pruned.pt").exists() and (folder / "yolo_pruned.onnx").exists()
    elif "train" in command:
        assert "accuracy" in text and list((folder / "out").glob("*.onnx"))


def test_the_digits_quick_look_stops_at_once_without_torch_pruning_or_runs(folder):
    import importlib.util

    command = "python -m examples.digits.benchmark --seeds 1 --budgets 0.5 --epochs 2 --docs out/quick"
    assert command in COVERED_ELSEWHERE
    if importlib.util.find_spec("torch_pruning") is None:
        done = run(command, folder, timeout=120)
        assert done.returncode != 0 and "pip install -e '.[benchmarks]'" in done.stderr
        assert "Traceback" not in done.stderr
    else:
        _ok(run(command, folder, timeout=1800))
        assert (folder / "out" / "quick" / "digits.md").exists() and not (folder / "docs").exists()


def status_cells(text: str) -> list[str]:
    """The cells of the table in the README's Status section (header row included, separator row left out)."""
    section = text.split("\n## Status\n", 1)[1].split("\n## ", 1)[0]
    rows = [line.strip() for line in section.splitlines() if line.startswith("|")]
    rows = [row for row in rows if not re.fullmatch(r"[|:\- ]+", row)]
    return [cell.strip() for row in rows for cell in re.split(r"(?<!\\)\|", row.strip("|"))]


def test_the_readme_is_short_and_its_status_cells_are_claims_not_tables():
    text = (ROOT / "README.md").read_text()
    assert len(text.splitlines()) <= README_LINES, f"README.md has {len(text.splitlines())} lines: move detail to docs/"
    cells = status_cells(text)
    assert len(cells) >= 20  # the table is there and was read
    long = [cell for cell in cells if len(cell) > STATUS_CELL_CHARS]
    assert not long, f"Status cells over {STATUS_CELL_CHARS} characters (put the figures in docs/ and link): {long}"


@pytest.mark.parametrize("page", ["README.md", *sorted(str(p.relative_to(ROOT)) for p in (ROOT / "docs").glob("*.md"))])
def test_relative_links_point_to_files(page):
    path = ROOT / page
    targets = [t for t in re.findall(r"\]\(([^)\s]+)\)", path.read_text()) if not re.match(r"[a-z][a-z0-9+.-]*:|#", t)]
    missing = [t for t in targets if not (path.parent / t.split("#")[0]).exists()]
    assert not missing, f"{page} links to files that do not exist: {missing}"
    if page == "README.md":
        assert any(t.startswith("docs/") for t in targets)  # links were found
