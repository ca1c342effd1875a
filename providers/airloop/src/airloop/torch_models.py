"""PyTorch modules for the ``torch:`` estimators of ``airloop.steps.training.train``.

Imports torch: only the ``torch`` runtime (or an environment with torch) imports this module.
A module for ``torch:package.module.Class`` is built as ``Class(n_features=..., n_classes=...,
**module_params)`` and maps float32 rows ``[N, n_features]`` to class logits ``[N, n_classes]``;
``MLPClassifier`` is the one to start with.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


class MLPClassifier(torch.nn.Module):
    """A multi-layer perceptron: ``Linear -> ReLU (-> Dropout)`` per hidden layer, then class logits.

    :param n_features: input columns (given by the trainer).
    :param n_classes: classes (given by the trainer).
    :param hidden_sizes: the width of each hidden layer.
    :param dropout: dropout probability after each hidden layer (0 leaves it out).
    """

    def __init__(
        self, n_features: int, n_classes: int, hidden_sizes: Sequence[int] = (64, 32), dropout: float = 0.0
    ) -> None:
        super().__init__()
        layers: list[torch.nn.Module] = []
        width = n_features
        for size in hidden_sizes:
            layers += [torch.nn.Linear(width, int(size)), torch.nn.ReLU()]
            if dropout:
                layers.append(torch.nn.Dropout(float(dropout)))
            width = int(size)
        layers.append(torch.nn.Linear(width, n_classes))
        self.layers = torch.nn.Sequential(*layers)

    def forward(self, rows: torch.Tensor) -> torch.Tensor:
        return self.layers(rows)


class Standardize(torch.nn.Module):
    """``(rows - mean) / scale`` with the training split's statistics kept as buffers, so the exported
    graph (and the OpenVINO IR made from it) takes the raw features."""

    def __init__(self, mean: torch.Tensor, scale: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("mean", mean)
        self.register_buffer("scale", scale)

    def forward(self, rows: torch.Tensor) -> torch.Tensor:
        return (rows - self.mean) / self.scale
