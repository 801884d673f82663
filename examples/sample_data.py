"""Sample data in every format ``secure-fed slave --data`` reads, from the bundled datasets.

Writes, under ``--out`` (default ``sample-data``):

* ``images/part-K/<digit>/<n>.png``: the scikit-learn digits as 8×8 grey PNG images (pixel
  values 0…16 stretched to 0…255), in one folder per part, one subfolder per class; for
  ``examples/image-schema.toml``;
* ``clinic-K.parquet``: the breast-cancer table in parts, in its own units, the label
  ``malignant`` or ``benign`` in the column ``diagnosis``; for ``examples/schema.toml``;
* ``clinic-K.csv``: the same parts as CSV.

Usage: ``python examples/sample_data.py [--out DIR] [--parts K] [--images-per-class N]
[--rows N]``
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from secure_fed.data.datasets import load_bundled


def write_image_folders(out: Path, parts: int, per_class: int, seed: int = 0) -> list[Path]:
    """``parts`` image folders of the digits, ``per_class`` images of each digit in each."""
    digits = load_bundled("digits", scaled=False)
    rng = np.random.default_rng(seed)
    folders = [out / "images" / f"part-{'abcdefghij'[k]}" for k in range(parts)]
    for label in range(digits.num_classes):
        rows = rng.permutation(np.flatnonzero(digits.labels == label))[: parts * per_class]
        for k, chunk in enumerate(np.array_split(rows, parts)):
            target = folders[k] / digits.class_names[label]
            target.mkdir(parents=True, exist_ok=True)
            for i in chunk:
                pixels = np.clip(digits.features[i] * 255.0 / 16.0, 0, 255).round()
                Image.fromarray(pixels.astype(np.uint8).reshape(8, 8), mode="L").save(
                    target / f"{int(i):04d}.png")
    return folders


def write_tables(out: Path, parts: int, rows: int | None, seed: int = 0) -> list[Path]:
    """``parts`` Parquet files (and the same parts as CSV) of the breast-cancer table."""
    data = load_bundled("breast_cancer", scaled=False)
    order = np.random.default_rng(seed).permutation(len(data))[:rows]
    paths = []
    for k, part in enumerate(np.array_split(order, parts)):
        name = f"clinic-{'abcdefghij'[k]}"
        columns = {n: data.features[part, j].astype(np.float64)
                   for j, n in enumerate(data.feature_names)}
        labels = [data.class_names[c] for c in data.labels[part]]
        pq.write_table(pa.table({**columns, "diagnosis": labels}), out / f"{name}.parquet")
        with (out / f"{name}.csv").open("w", newline="", encoding="utf-8") as handle:
            writer = csv.writer(handle)
            writer.writerow([*data.feature_names, "diagnosis"])
            for i, label in zip(part, labels, strict=True):
                writer.writerow([*(f"{v:.6g}" for v in data.features[i]), label])
        paths.append(out / f"{name}.parquet")
    return paths


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("sample-data"))
    parser.add_argument("--parts", type=int, default=3, help="data owners (default 3)")
    parser.add_argument("--images-per-class", type=int, default=20,
                        help="images of each digit per part (default 20)")
    parser.add_argument("--rows", type=int, default=None,
                        help="rows of the breast-cancer table used in all (default: all 569)")
    args = parser.parse_args(argv)
    if not 1 <= args.parts <= 10:
        parser.error("--parts must be 1 to 10")
    args.out.mkdir(parents=True, exist_ok=True)
    folders = write_image_folders(args.out, args.parts, args.images_per_class)
    tables = write_tables(args.out, args.parts, args.rows)
    for path in [*folders, *tables]:
        print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
