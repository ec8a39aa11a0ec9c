"""Registered networks, chosen by name.

    model = build_model("seed")          # the seed's 16,426-parameter CNN
    logits = model(images)               # normalized (N, 1, 28, 28) float -> (N, 10) logits

Every model takes normalized (N, 1, 28, 28) images and returns (N, classes)
logits; data.contract applies log-softmax (the seed's last layer) outside the
network, for built-in and user networks alike.
"""

from __future__ import annotations

import torch
from torch import nn

from mnist_cnn.data.idx import NUM_CLASSES


def conv_bn_relu(c_in: int, c_out: int, padding: int = 0, bias: bool = True) -> nn.Sequential:
    # BatchNorm's shift makes a conv bias redundant, but the seed keeps it and its
    # published 16,426 count includes it; smaller models drop it (bias=False).
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, kernel_size=3, padding=padding, bias=bias),
        nn.BatchNorm2d(c_out),
        nn.ReLU(inplace=True),
    )


class GlobalAvgPool(nn.Module):
    """(N, C, H, W) -> (N, C): the mean over the spatial dims. Equal to AdaptiveAvgPool2d(1)
    + Flatten, but its backward is deterministic on CUDA, where AdaptiveAvgPool2d's is not."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean(dim=(2, 3))


class SeedNet(nn.Module):
    """The seed notebook's network, layer for layer: 16,426 parameters."""

    def __init__(self, dropout: float = 0.1, num_classes: int = NUM_CLASSES) -> None:
        super().__init__()
        self.features = nn.Sequential(
            conv_bn_relu(1, 16),  # (N, 16, 26, 26)
            conv_bn_relu(16, 16),  # (N, 16, 24, 24)
            nn.MaxPool2d(2),  # (N, 16, 12, 12)
            conv_bn_relu(16, 16),  # (N, 16, 10, 10)
            conv_bn_relu(16, 32),  # (N, 32, 8, 8)
            nn.MaxPool2d(2),  # (N, 32, 4, 4)
            nn.Conv2d(32, 8, kernel_size=1),  # (N, 8, 4, 4): 1x1 squeeze, no BN in the seed
            conv_bn_relu(8, 16, padding=1),  # (N, 16, 4, 4)
            conv_bn_relu(16, 16),  # (N, 16, 2, 2)
        )
        flat = 16 * 2 * 2  # 64: channels x height x width after the last conv
        self.head = nn.Sequential(
            nn.Flatten(),  # (N, 64)
            nn.Linear(flat, 40),
            nn.ReLU(inplace=True),
            nn.Dropout(dropout),
            nn.Linear(40, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))  # (N, classes) logits


class TinyNet(nn.Module):
    """Under 8,000 parameters (7,578): bias-free convs, a global average pool and
    one Linear layer instead of the seed's two-layer head. `widths` are the five
    convolutions' output channels (model_args.widths), for searching the small end."""

    def __init__(self, num_classes: int = NUM_CLASSES, widths: tuple[int, ...] = (8, 12, 16, 16, 16)) -> None:
        super().__init__()
        if len(widths) != 5 or min(widths) < 1:
            raise ValueError(f"widths must be five positive channel counts, got {list(widths)}")
        c1, c2, c3, c4, c5 = widths
        self.features = nn.Sequential(
            conv_bn_relu(1, c1, bias=False),  # (N, c1, 26, 26)
            conv_bn_relu(c1, c2, bias=False),  # (N, c2, 24, 24)
            nn.MaxPool2d(2),  # (N, c2, 12, 12)
            conv_bn_relu(c2, c3, bias=False),  # (N, c3, 10, 10)
            conv_bn_relu(c3, c4, bias=False),  # (N, c4, 8, 8)
            conv_bn_relu(c4, c5, bias=False),  # (N, c5, 6, 6)
            GlobalAvgPool(),  # (N, c5)
        )
        self.head = nn.Linear(c5, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))  # (N, classes) logits


class VggNet(nn.Module):
    """VGG-style stages for the study of issue 14: two padded 3x3 convolutions at each of
    28, 14 and 7 pixels (max-pool between), a global average pool and one Linear layer.
    The stage widths are scalar model_args (w1, w2, w3), so that `tune` can search them:
    9 (w1 + w1^2 + w1 w2 + w2^2 + w2 w3 + w3^2) conv weights + 4 (w1 + w2 + w3) BatchNorm
    + 10 w3 + 10 head: 15,802 parameters at the default (12, 18, 24), 7,154 at (8, 12, 16)."""

    def __init__(self, num_classes: int = NUM_CLASSES, w1: int = 12, w2: int = 18, w3: int = 24) -> None:
        super().__init__()
        if min(w1, w2, w3) < 1:
            raise ValueError(f"widths must be positive, got w1={w1}, w2={w2}, w3={w3}")
        self.features = nn.Sequential(
            conv_bn_relu(1, w1, padding=1, bias=False),  # (N, w1, 28, 28)
            conv_bn_relu(w1, w1, padding=1, bias=False),  # (N, w1, 28, 28)
            nn.MaxPool2d(2),  # (N, w1, 14, 14)
            conv_bn_relu(w1, w2, padding=1, bias=False),  # (N, w2, 14, 14)
            conv_bn_relu(w2, w2, padding=1, bias=False),  # (N, w2, 14, 14)
            nn.MaxPool2d(2),  # (N, w2, 7, 7)
            conv_bn_relu(w2, w3, padding=1, bias=False),  # (N, w3, 7, 7)
            conv_bn_relu(w3, w3, padding=1, bias=False),  # (N, w3, 7, 7): receptive field 32 px
            GlobalAvgPool(),  # (N, w3)
        )
        self.head = nn.Linear(w3, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))  # (N, classes) logits


HEADS = ("gap", "fc")


class FamilyNet(nn.Module):
    """The searchable family: three stages at 28, 14 and 7 pixels (max-pool between), each of
    d1 / d2 / d3 padded 3x3 convolutions of width w1 / w2 / w3, an optional 1x1 squeeze to
    `squeeze` channels, then a head: gap (global average pool, one Linear) or fc (2x2 max-pool
    to 3x3, flatten, one Linear). Every choice is a scalar model_arg, so `tune --max-params`
    searches networks as it searches recipes; at its defaults it computes what `vgg` does."""

    def __init__(
        self,
        num_classes: int = NUM_CLASSES,
        w1: int = 12,
        w2: int = 18,
        w3: int = 24,
        d1: int = 2,
        d2: int = 2,
        d3: int = 2,
        squeeze: int = 0,
        head: str = "gap",
    ) -> None:
        super().__init__()
        if min(w1, w2, w3, d1, d2, d3) < 1 or squeeze < 0:
            raise ValueError(
                f"widths and depths must be positive and squeeze >= 0, got w=({w1}, {w2}, {w3}), "
                f"d=({d1}, {d2}, {d3}), squeeze={squeeze}"
            )
        if head not in HEADS:
            raise ValueError(f"head must be one of {', '.join(HEADS)}, got {head!r}")
        layers: list[nn.Module] = []
        c = 1
        for stage, (width, depth) in enumerate(((w1, d1), (w2, d2), (w3, d3))):
            if stage:
                layers.append(nn.MaxPool2d(2))  # 28 -> 14 -> 7 pixels
            for _ in range(depth):
                layers.append(conv_bn_relu(c, width, padding=1, bias=False))  # (N, width, side, side)
                c = width
        if squeeze:  # 1x1: fewer channels into the head, as the seed's 32 -> 8
            layers.append(
                nn.Sequential(nn.Conv2d(c, squeeze, 1, bias=False), nn.BatchNorm2d(squeeze), nn.ReLU(inplace=True))
            )
            c = squeeze
        self.features = nn.Sequential(*layers)  # (N, c, 7, 7)
        if head == "gap":
            self.head = nn.Sequential(GlobalAvgPool(), nn.Linear(c, num_classes))  # (N, c) -> (N, classes)
        else:  # (N, c, 3, 3) -> (N, 9c) -> (N, classes): where a digit's parts are stays known
            self.head = nn.Sequential(nn.MaxPool2d(2), nn.Flatten(), nn.Linear(9 * c, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))  # (N, classes) logits


MODELS: dict[str, type[nn.Module]] = {
    "seed": SeedNet,
    "tiny": TinyNet,
    "vgg": VggNet,
    "family": FamilyNet,
}


def build_model(name: str, num_classes: int = NUM_CLASSES) -> nn.Module:
    """A built-in network by name (networks.reference also builds users' own)."""
    if name not in MODELS:
        raise KeyError(name)
    return MODELS[name](num_classes=num_classes)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
