"""Loading a data owner's image folder: one subfolder per class, decoded with Pillow.

The folder is untrusted input: its files are counted before any is opened, a symbolic link
that leads outside the folder is refused, each file's size and each image's pixel count (read
from its header, before it is decoded: a small file may claim a huge image) are checked, and
a file Pillow cannot decode is named in a one-line :class:`~secure_fed.errors.DataError`.
Every image is converted to the schema's channels and resized to its ``height × width``
(:class:`secure_fed.config.image.ImageSpec`), and its intensities 0…255 are mapped onto the
schema's ``scale_to`` interval: public constants only, so one image never changes how another
is prepared.

    images/
      cat/ 001.png 002.jpg …        subfolder names are the schema's classes
      dog/ …                        a part may lack a class; a folder that is not a class is
                                    an error
"""

from __future__ import annotations

import logging
import os
import warnings
from pathlib import Path

import numpy as np

from secure_fed.config.image import PIXEL_HIGH
from secure_fed.config.schema import DataSchema
from secure_fed.data.datasets import Dataset
from secure_fed.data.scaling import SCALED_PREPROCESSING
from secure_fed.errors import DataError

logger = logging.getLogger(__name__)

#: Default most image files accepted in one folder.
DEFAULT_MAX_FILES = 100_000
#: Default most pixels (width × height) of one image before it is resized.
DEFAULT_MAX_PIXELS = 4096 * 4096
#: Default largest image file accepted (bytes).
DEFAULT_MAX_FILE_BYTES = 32 * 2**20


def image_files(folder: Path, *, max_files: int = DEFAULT_MAX_FILES) -> list[tuple[str, Path]]:
    """``(class folder, file)`` of every image under ``folder``, sorted by relative path.

    Hidden entries (names starting with ``.``) are skipped. A symbolic link is followed only
    when it stays inside ``folder``.

    Raises:
        DataError: ``folder`` is not a folder, a file lies outside a class subfolder, a link
            leads outside, or there are more than ``max_files`` files.
    """
    root = Path(folder)
    if not root.is_dir():
        raise DataError(f"image folder {str(root)!r} does not exist or is not a folder")
    top = root.resolve()
    found: list[tuple[str, Path]] = []
    for entry in sorted(root.iterdir()):
        if entry.name.startswith("."):
            continue
        _inside(entry, top, root)
        if not entry.is_dir():
            raise DataError(f"{str(entry)!r} is not in a class subfolder; put each image in the "
                            "subfolder named after its class")
        for directory, subdirs, files in os.walk(entry, followlinks=False):
            subdirs[:] = sorted(d for d in subdirs if not d.startswith("."))
            for name in sorted(files):
                if name.startswith("."):
                    continue
                path = Path(directory) / name
                _inside(path, top, root)
                found.append((entry.name, path))
                if len(found) > max_files:
                    raise DataError(f"image folder {str(root)!r} holds more than {max_files} "
                                    "files; raise max_files if this is expected")
            for name in subdirs:
                _inside(Path(directory) / name, top, root)
    return sorted(found, key=lambda item: item[1].relative_to(root).as_posix())


def _inside(path: Path, top: Path, root: Path) -> None:
    if path.is_symlink():
        target = path.resolve()
        if target != top and top not in target.parents:
            raise DataError(f"{str(path)!r} is a symbolic link to {str(target)!r}, outside the "
                            f"image folder {str(root)!r}; copy the file into the folder instead")


def load_image_folder(folder: str | Path, schema: DataSchema, *,
                      max_files: int = DEFAULT_MAX_FILES, max_pixels: int = DEFAULT_MAX_PIXELS,
                      max_file_bytes: int = DEFAULT_MAX_FILE_BYTES) -> Dataset:
    """The images under ``folder`` as flat ``C·H·W`` rows, scaled with public constants.

    Args:
        folder: one subfolder per class, named as in the schema's ``classes``.
        schema: the federation's schema; it must have an ``[image]`` table.
        max_files: most image files accepted.
        max_pixels: most pixels of one image as stored (decompression bombs).
        max_file_bytes: largest image file accepted (bytes).

    Raises:
        DataError: the folder does not fit the schema, a limit is broken, a link leads
            outside, or a file is not an image Pillow can decode.
    """
    from PIL import Image

    root = Path(folder)
    image = schema.image
    if image is None:
        raise DataError(f"{str(root)!r} is a folder of images, but the federation's schema "
                        f"describes a table of {schema.num_features} columns; give a CSV, NPZ "
                        "or Parquet file with --data")
    files = image_files(root, max_files=max_files)
    classes = {name: i for i, name in enumerate(schema.classes)}
    strangers = sorted({c for c, _ in files if c not in classes} | {
        d.name for d in root.iterdir()
        if d.is_dir() and not d.name.startswith(".") and d.name not in classes})
    if strangers:
        raise DataError(f"image folder {str(root)!r}: subfolder(s) {strangers[:10]} are not "
                        f"among the federation's classes {schema.classes}; rename or remove them")
    if not files:
        raise DataError(f"image folder {str(root)!r} holds no images; expected one subfolder "
                        f"per class ({', '.join(schema.classes[:10])}) with image files")
    start, width = (0.0, 1.0) if schema.scale_to == "0..1" else (-1.0, 2.0)
    features = np.empty((len(files), image.size), dtype=np.float32)
    labels = np.empty(len(files), dtype=np.int64)
    for row, (class_name, path) in enumerate(files):
        size = path.stat().st_size
        if size > max_file_bytes:
            raise DataError(f"image {str(path)!r} is {size} bytes; the limit is {max_file_bytes} "
                            "bytes (raise max_file_bytes if this is expected)")
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("error", Image.DecompressionBombWarning)
                with Image.open(path) as picture:
                    pixels = picture.size[0] * picture.size[1]
                    if pixels > max_pixels:
                        raise DataError(
                            f"image {str(path)!r} is {picture.size[0]}×{picture.size[1]} pixels; "
                            f"the limit is {max_pixels} pixels (raise max_pixels if this is "
                            "expected)")
                    converted = picture.convert(image.pillow_mode).resize(
                        (image.width, image.height), Image.Resampling.BILINEAR)
                    array = np.asarray(converted, dtype=np.float32)
        except DataError:
            raise
        except (OSError, ValueError, Image.DecompressionBombError,
                Image.DecompressionBombWarning) as exc:
            raise DataError(f"image {str(path)!r} cannot be decoded ({exc}); remove or replace "
                            "the file") from None
        if array.ndim == 2:
            array = array[:, :, None]
        chw = np.transpose(array, (2, 0, 1)).reshape(-1)
        features[row] = start + width * (np.clip(chw, 0.0, PIXEL_HIGH) / PIXEL_HIGH)
        labels[row] = classes[class_name]
    logger.info("loaded %s: %d images as %s", root, len(files), image.describe())
    return Dataset(name=root.name, features=features, labels=labels,
                   num_classes=schema.num_classes, feature_names=pixel_names(schema),
                   class_names=list(schema.classes), preprocessing=SCALED_PREPROCESSING)


def pixel_names(schema: DataSchema) -> list[str]:
    """``c{channel}_y{row}_x{column}`` for every model input of an image schema, in order."""
    image = schema.image
    if image is None:
        return list(schema.feature_names)
    return [f"c{c}_y{y}_x{x}" for c in range(image.channels) for y in range(image.height)
            for x in range(image.width)]
