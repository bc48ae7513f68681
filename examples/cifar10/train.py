"""CIFAR-10 with a CIFAR ResNet (ResNet-56 as in SP-LAMP's and SSR's tables), pruned to a latency budget.

    python -m examples.cifar10.train --data ~/datasets/cifar10 --method halp --budget 0.7
    torchrun --nproc_per_node 4 -m examples.cifar10.train --data ~/datasets/cifar10 --method ssr
    python -m examples.cifar10.train --fake-data --base-epochs 1 --epochs 1        # a smoke test

``--data`` holds torchvision's ``cifar-10-batches-py`` (nothing is downloaded). The steps are in
examples/recipe.py; the defaults follow the papers' CIFAR schedules (160 epochs of training, 60 of
fine-tuning; HALP prunes every 40 iterations for 30 steps).
"""

from __future__ import annotations

import torch
import torchvision
import torchvision.transforms as T

from examples.models import resnet20, resnet56
from examples.recipe import as_command, parser, run

MODELS = {"resnet56": resnet56, "resnet20": resnet20}
MEAN, STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)


def datasets(args):
    train_transform = T.Compose([T.RandomCrop(32, padding=4), T.RandomHorizontalFlip(), T.ToTensor(), T.Normalize(MEAN, STD)])
    test_transform = T.Compose([T.ToTensor(), T.Normalize(MEAN, STD)])
    if args.fake_data:
        return (torchvision.datasets.FakeData(args.fake_size, (3, 32, 32), 10, train_transform, random_offset=0),
                torchvision.datasets.FakeData(args.fake_size // 2, (3, 32, 32), 10, test_transform, random_offset=1))
    if not args.data:
        raise SystemExit("pass --data (the folder holding cifar-10-batches-py) or --fake-data")
    return (torchvision.datasets.CIFAR10(args.data, train=True, transform=train_transform, download=False),
            torchvision.datasets.CIFAR10(args.data, train=False, transform=test_transform, download=False))


def main(argv=None) -> dict:
    # 0.7 by default: ResNet-56's first stage has 16 channels, one onnxruntime step, so it cannot shrink; the
    # smallest plan measured 0.605 of the model while another job shared the machine (0.5 reached when quiet)
    args = parser(__doc__, tuple(MODELS), "resnet56", default_budget=0.7).parse_args(argv)
    return run(args, lambda name: MODELS[name](), datasets, (torch.zeros(1, 3, 32, 32),))


if __name__ == "__main__":
    as_command(main)
