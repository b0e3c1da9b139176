"""The standard meta-learning backbones, as plain ``nn.Sequential`` models."""
from __future__ import annotations

from torch import nn

ACTIVATIONS = {"relu": nn.ReLU, "tanh": nn.Tanh, "sigmoid": nn.Sigmoid}


def mlp(sizes, activation: str = "relu") -> nn.Sequential:
    """``Linear``/activation layers through ``sizes`` (e.g. ``[1, 40, 40, 1]``), no final activation."""
    sizes = list(sizes)
    if len(sizes) < 2 or any(not isinstance(s, int) or s < 1 for s in sizes):
        raise ValueError(f"mlp: sizes must be at least two positive integers, got {sizes}")
    if activation not in ACTIVATIONS:
        raise ValueError(f"mlp: activation must be one of {sorted(ACTIVATIONS)}, got {activation!r}")
    layers = []
    for i, (fan_in, fan_out) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers.append(nn.Linear(fan_in, fan_out))
        if i < len(sizes) - 2:
            layers.append(ACTIVATIONS[activation]())
    return nn.Sequential(*layers)


def conv4(in_channels: int = 1, n_way: int = 5, hidden: int = 64, image_size: int = 28) -> nn.Sequential:
    """The MAML paper's backbone: 4 x (conv3x3 pad 1, BatchNorm2d, ReLU, maxpool 2x2), flatten, Linear.

    Batch norm always normalises with the statistics of the current batch (no running
    statistics), as in the MAML reference code.
    """
    for name, value in (("in_channels", in_channels), ("n_way", n_way), ("hidden", hidden),
                        ("image_size", image_size)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"conv4: {name} must be a positive integer, got {value!r}")
    if image_size < 16:
        raise ValueError(f"conv4: image_size must be at least 16 for four 2x2 poolings, got {image_size}")
    layers, channels, size = [], in_channels, image_size
    for _ in range(4):
        layers += [nn.Conv2d(channels, hidden, 3, padding=1),
                   nn.BatchNorm2d(hidden, track_running_stats=False),
                   nn.ReLU(),
                   nn.MaxPool2d(2)]
        channels, size = hidden, size // 2
    layers += [nn.Flatten(), nn.Linear(hidden * size * size, n_way)]
    return nn.Sequential(*layers)
