"""Small in-memory data shared by the training tests."""

import numpy as np
import torch

from dmil_fast.train import FeatureData


def separable_data(sizes=(90, 32, 32)) -> FeatureData:
    """Three classes, 6-d features per modality shifted by +/- the label, all four type codes;
    ``sizes`` = (train, val, test). The same tensors on every call and in every process."""
    g = torch.Generator().manual_seed(0)
    splits = []
    for size in sizes:
        y = torch.randint(0, 3, (size,), generator=g)
        x1 = torch.randn(size, 6, generator=g) + y[:, None].float()
        x2 = torch.randn(size, 6, generator=g) - y[:, None].float()
        splits.append((x1, x2, y, np.arange(size) % 4))
    return FeatureData.from_tensors(*splits, num_classes=3,
                                    type_names=["redundancy", "unique_1", "unique_2", "synergy"])
