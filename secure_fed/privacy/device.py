"""Which torch device a slave's private training runs on.

The device changes where the arithmetic happens, never what is released: the model and
the Poisson batches live on the device, Opacus (or the linear-clipping step) clips there,
the noise is drawn on the CPU from the run's ChaCha20 stream
(:mod:`secure_fed.privacy.noise`) and added to the clipped sum on the device, and every
result is copied back to the CPU before a caller encodes or encrypts it. The privacy
argument (add/remove one record, the discrete Gaussian of σC on the clipped sum) is the
same on every device.
"""

from __future__ import annotations

import torch

from secure_fed.errors import ConfigError

#: What ``secure-fed slave --device`` accepts.
DEVICE_CHOICES = ("auto", "cpu", "cuda")


def resolve_device(name: str) -> torch.device:
    """The torch device ``name`` asks for.

    Args:
        name: ``"auto"`` (CUDA when ``torch.cuda.is_available()``, else the CPU), ``"cpu"``
            or ``"cuda"`` (also ``"cuda:N"`` for GPU N).

    Raises:
        ConfigError: an unknown name, or CUDA asked for where torch sees no GPU.
    """
    if not isinstance(name, str):
        raise ConfigError(f"device must be one of {', '.join(DEVICE_CHOICES)}, got {name!r}")
    text = name.strip().lower()
    if text == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if text == "cpu":
        return torch.device("cpu")
    if text == "cuda" or text.startswith("cuda:"):
        if not torch.cuda.is_available():
            raise ConfigError(f"device {name!r}: torch sees no CUDA GPU here (torch "
                              f"{torch.__version__}, CUDA build {torch.version.cuda or 'none'});"
                              " use --device cpu, or --device auto to take a GPU when present")
        index = text.partition(":")[2]
        if index and (not index.isdigit() or int(index) >= torch.cuda.device_count()):
            raise ConfigError(f"device {name!r}: this machine has "
                              f"{torch.cuda.device_count()} CUDA GPU(s), numbered from 0")
        return torch.device(text)
    raise ConfigError(f"device must be one of {', '.join(DEVICE_CHOICES)} (or cuda:N), "
                      f"got {name!r}")
