"""ImageNet with a torchvision ResNet-50 (HALP's and SP-LAMP's main table), pruned to a latency budget.

    python -m examples.imagenet.train --data ~/datasets/imagenet --checkpoint resnet50.pth --method halp
    torchrun --nproc_per_node 8 -m examples.imagenet.train --data ~/datasets/imagenet --checkpoint r50.pth
    python -m examples.imagenet.train --fake-data --model resnet18 --image-size 64 --base-epochs 1 --epochs 1

``--data`` holds ``train/`` and ``val/`` in ImageFolder layout (nothing is downloaded); ``--checkpoint``
a state dict of the torchvision model to start from (training ResNet-50 from scratch takes days).
Latency is measured at batch 1 and ``--image-size`` on the engine.
"""

from __future__ import annotations

import torch
import torchvision
import torchvision.transforms as T

from examples.recipe import as_command, parser, run

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def datasets(args):
    size = args.image_size
    train_transform = T.Compose([T.RandomResizedCrop(size), T.RandomHorizontalFlip(), T.ToTensor(), T.Normalize(MEAN, STD)])
    test_transform = T.Compose([T.Resize(int(size * 8 / 7)), T.CenterCrop(size), T.ToTensor(), T.Normalize(MEAN, STD)])
    if args.fake_data:
        return (torchvision.datasets.FakeData(args.fake_size, (3, size, size), 1000, train_transform, random_offset=0),
                torchvision.datasets.FakeData(args.fake_size // 2, (3, size, size), 1000, test_transform, random_offset=1))
    if not args.data:
        raise SystemExit("pass --data (the folder holding train/ and val/) or --fake-data")
    return (torchvision.datasets.ImageFolder(f"{args.data}/train", train_transform),
            torchvision.datasets.ImageFolder(f"{args.data}/val", test_transform))


def main(argv=None) -> dict:
    p = parser(__doc__, ("resnet50", "resnet18", "mobilenet_v2"), "resnet50")
    p.add_argument("--image-size", type=int, default=224)
    p.set_defaults(base_epochs=90, epochs=30, batch_size=64, lr=0.1, prune_every=40, prune_steps=30)
    args = p.parse_args(argv)
    return run(args, lambda name: torchvision.models.get_model(name, weights=None), datasets,
               (torch.zeros(1, 3, args.image_size, args.image_size),))


if __name__ == "__main__":
    as_command(main)
