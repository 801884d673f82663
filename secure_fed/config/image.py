"""The ``[image]`` table of a federation's data schema: the size every slave's images become.

An image federation's records are pictures in folders (one subfolder per class), decoded at
each slave and converted to the schema's ``channels`` (1: grey, 3: RGB, 4: RGBA) and resized to
``height × width`` pixels before training. Pixel intensities 0…255 are mapped onto the schema's
``scale_to`` interval with these public constants only, so one picture never changes how
another is prepared (the sensitivity DP-SGD relies on holds for the prepared data too)::

    label = "digit"
    classes = ["0", "1", "2"]
    scale_to = "0..1"
    features = []

    [image]
    channels = 1
    height = 8
    width = 8
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

MAX_IMAGE_SIDE = 1024
"""Largest height or width (pixels) a schema may ask for."""
PIXEL_HIGH = 255.0
"""The public upper bound of a pixel intensity (8 bits per channel)."""


class ImageSpec(BaseModel):
    """The shape every slave's images are converted to: ``channels × height × width``.

    Args:
        channels: 1 (grey, Pillow mode ``L``), 3 (``RGB``) or 4 (``RGBA``).
        height: rows of pixels after resizing (1…1024).
        width: columns of pixels after resizing (1…1024).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    channels: Literal[1, 3, 4] = 1
    height: int = Field(ge=1, le=MAX_IMAGE_SIDE)
    width: int = Field(ge=1, le=MAX_IMAGE_SIDE)

    @property
    def size(self) -> int:
        """C·H·W, the number of model inputs one image gives."""
        return self.channels * self.height * self.width

    @property
    def pillow_mode(self) -> str:
        """The Pillow mode images are converted to (``L``, ``RGB`` or ``RGBA``)."""
        return {1: "L", 3: "RGB", 4: "RGBA"}[self.channels]

    def describe(self) -> str:
        """``C×H×W`` in words, e.g. ``1×8×8``."""
        return f"{self.channels}×{self.height}×{self.width}"
