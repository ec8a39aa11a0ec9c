"""A user network for mnist-cnn: fully convolutional, with a global-average-pool head.

Under 8,000 parameters (6,114 at width 16) and shaped differently from the seed:
no Linear layer at all -- a 1x1 convolution makes one map per class and the
global average pool turns each map into that class's logit.

    mnist-cnn check   --model examples/gap_net.py:GapNet --max-params 8000 --require batchnorm,dropout,gap
    mnist-cnn summary --model examples/gap_net.py:GapNet
    mnist-cnn train   --model examples/gap_net.py:GapNet --epochs 2

Like every network mnist-cnn trains, it takes normalized (N, 1, 28, 28) images and
returns (N, num_classes) logits; the tool applies log-softmax around it.
"""

import torch
from torch import nn


def conv_bn_relu(c_in: int, c_out: int) -> nn.Sequential:
    # no conv bias: the BatchNorm right after it has its own shift
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True))


class GapNet(nn.Module):
    def __init__(self, num_classes: int = 10, width: int = 16, dropout: float = 0.1) -> None:
        super().__init__()
        self.features = nn.Sequential(
            conv_bn_relu(1, width // 2),       # (N, 8, 26, 26)
            conv_bn_relu(width // 2, width),   # (N, 16, 24, 24)
            nn.MaxPool2d(2),                   # (N, 16, 12, 12)
            conv_bn_relu(width, width),        # (N, 16, 10, 10)
            conv_bn_relu(width, width),        # (N, 16, 8, 8)
            nn.Dropout(dropout),
            nn.Conv2d(width, num_classes, 1),  # (N, 10, 8, 8): one map per class
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x).mean(dim=(2, 3))  # (N, 10) logits: the global average of each class map
