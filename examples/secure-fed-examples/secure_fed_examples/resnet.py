"""``resnet_small``: a small residual CNN for images, trainable with DP-SGD.

GroupNorm instead of BatchNorm (BatchNorm mixes the records of a batch, which DP-SGD cannot
bound); images may arrive flat (``in_channels × height × width`` features, as a table or the
bundled digits hold them) and are reshaped inside.
"""

from __future__ import annotations

import torch
from torch import nn

from secure_fed.errors import ModelError
from secure_fed.models.registry import MAX_CHANNELS, MAX_CLASSES, MAX_PARAMETERS, check_int

#: Largest image side accepted (pixels).
MAX_SIDE = 512
#: Largest network width (channels of the first stage).
MAX_NETWORK_WIDTH = 256


def _groups(channels: int) -> int:
    """GroupNorm groups for ``channels``: 4 when they divide evenly, else one per channel."""
    return 4 if channels % 4 == 0 else channels


class ResidualBlock(nn.Module):
    """conv → GroupNorm → ReLU → conv → GroupNorm, plus the input (projected when the shape
    changes), then ReLU.

    Args:
        channels_in: input channels.
        channels_out: output channels.
        stride: stride of the first convolution (2 halves the image).
    """

    def __init__(self, channels_in: int, channels_out: int, stride: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(channels_in, channels_out, 3, stride=stride, padding=1, bias=False),
            nn.GroupNorm(_groups(channels_out), channels_out),
            nn.ReLU(),
            nn.Conv2d(channels_out, channels_out, 3, padding=1, bias=False),
            nn.GroupNorm(_groups(channels_out), channels_out),
        )
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or channels_in != channels_out:
            self.shortcut = nn.Sequential(
                nn.Conv2d(channels_in, channels_out, 1, stride=stride, bias=False),
                nn.GroupNorm(_groups(channels_out), channels_out),
            )
        self.relu = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu(self.body(x) + self.shortcut(x))


class ResNetSmall(nn.Module):
    """Stem conv, two residual blocks (the second at stride 2), global average pool, linear.

    Args:
        in_channels: image channels.
        height: image height (pixels).
        width: image width (pixels).
        num_classes: output width.
        channels: channels of the first stage (the second has twice as many).
    """

    def __init__(self, in_channels: int, height: int, width: int, num_classes: int,
                 channels: int) -> None:
        super().__init__()
        self.shape = (in_channels, height, width)
        self.stem = nn.Sequential(
            nn.Conv2d(in_channels, channels, 3, padding=1, bias=False),
            nn.GroupNorm(_groups(channels), channels),
            nn.ReLU(),
        )
        self.blocks = nn.Sequential(ResidualBlock(channels, channels, 1),
                                    ResidualBlock(channels, 2 * channels, 2))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Linear(2 * channels, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 2:
            x = x.reshape(x.shape[0], *self.shape)
        return self.head(torch.flatten(self.pool(self.blocks(self.stem(x))), 1))


def resnet_small(*, in_channels: int, height: int, width: int, num_classes: int,
                 channels: int = 16) -> nn.Module:
    """A small residual CNN for ``in_channels × height × width`` images.

    Args:
        in_channels: image channels (1…16).
        height: image height in pixels (4…512).
        width: image width in pixels (4…512).
        num_classes: output width (2…10000).
        channels: network width, channels of the first stage (4…256, a multiple of 4 keeps
            GroupNorm at 4 groups).
    """
    c_in = check_int("in_channels", in_channels, 1, MAX_CHANNELS)
    h = check_int("height", height, 4, MAX_SIDE)
    w = check_int("width", width, 4, MAX_SIDE)
    n_out = check_int("num_classes", num_classes, 2, MAX_CLASSES)
    c = check_int("channels", channels, 4, MAX_NETWORK_WIDTH)
    count = (9 * c_in * c + 2 * 9 * c * c + 9 * c * 2 * c + 9 * 4 * c * c + 2 * c * c
             + 2 * c * n_out)
    if count > MAX_PARAMETERS:
        raise ModelError(f"resnet_small with channels={c} would have about {count} parameters; "
                         f"the limit is {MAX_PARAMETERS}. Use fewer channels")
    return ResNetSmall(c_in, h, w, n_out, c)
