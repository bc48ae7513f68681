"""scikit-learn's bundled handwritten digits (1797 images, no download), upsampled to 32x32."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import TensorDataset


def digits(size: int = 32, test_share: float = 0.2, seed: int = 0) -> tuple[TensorDataset, TensorDataset]:
    """Train and test sets of 1-channel ``size`` x ``size`` images, normalized, split per class."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    bunch = load_digits()
    images = torch.as_tensor(bunch.images, dtype=torch.float32).unsqueeze(1) / 16.0
    images = F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False)
    images = (images - images.mean()) / images.std()
    labels = torch.as_tensor(bunch.target, dtype=torch.long)
    train, test = train_test_split(np.arange(len(labels)), test_size=test_share, random_state=seed, stratify=labels)
    return TensorDataset(images[train], labels[train]), TensorDataset(images[test], labels[test])


def jittered(dataset: TensorDataset, seed: int, degrees: float = 30.0, shift: float = 0.15,
             scale: tuple[float, float] = (0.8, 1.2)) -> TensorDataset:
    """``dataset`` with every image moved once by its own random affine transform (fixed by ``seed``): a
    harder digits task on which model capacity shows (ResNet-8 at width 16: 0.91-0.92 test accuracy,
    ResNet-20 at width 32: 0.97-0.98, 12 epochs, 32x32)."""
    from torchvision.transforms import v2

    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    transform = v2.RandomAffine(degrees=degrees, translate=(shift, shift), scale=scale)
    images, labels = dataset.tensors
    moved = torch.stack([transform(image) for image in images])
    torch.random.set_rng_state(generator_state)
    return TensorDataset(moved, labels)
