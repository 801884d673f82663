"""One DP-SGD run on a private copy of a model: Poisson batches and clipped, noised steps.

:class:`PlainRun` is its non-private counterpart (shuffled batches, plain SGD) for plans that
turn DP off (baselines only; see ``TrainingPlanSettings.dp``).

:class:`PrivateRun` is the machinery behind :mod:`secure_fed.privacy.training`: it deep-copies
the caller's module (which is never modified), draws Poisson batches with rate q exactly, and
runs each step either with :class:`~secure_fed.privacy.linear_clipping.LinearClippingStep` (the
default for models whose trainable layers are all ``nn.Linear``) or with a fresh Opacus
``PrivacyEngine`` (``make_private`` with the chosen ``grad_sample_mode``). Both release
``(Σ clip_C(g_i) + N(0, σ²C²)) / B`` per step, an empty batch included.

Randomness: two seeds derived from one (:func:`seeds`) drive the sampling and the noise
generators; see :mod:`secure_fed.privacy.training` for what a fixed seed implies.
"""

from __future__ import annotations

import copy
import math
import secrets
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

import numpy as np
import torch
from opacus import PrivacyEngine
from opacus.optimizers import DPOptimizer
from opacus.validators.errors import UnsupportedModuleError
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.utils.data import DataLoader, TensorDataset

from secure_fed.errors import PrivacyError
from secure_fed.privacy.linear_clipping import LinearClippingStep, supports

if TYPE_CHECKING:
    from secure_fed.privacy.training import DPSettings

#: Per-sample clipping used unless told otherwise: ``linear`` where it applies, else ``ew``.
DEFAULT_GRAD_SAMPLE_MODE = "auto"
GRAD_SAMPLE_MODES = ("auto", "linear", "hooks", "ew", "functorch")

LossFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


@contextmanager
def _quiet() -> Iterator[None]:
    """Silence two known, harmless warnings of Opacus/torch (secure RNG off; backward hook)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Secure RNG turned off")
        warnings.filterwarnings("ignore", message="Full backward hook is firing")
        yield


@contextmanager
def _opacus_errors() -> Iterator[None]:
    """Turn Opacus's refusal of a module (e.g. BatchNorm) into a PrivacyError."""
    try:
        yield
    except UnsupportedModuleError as exc:
        raise PrivacyError(
            f"this model cannot be trained with DP-SGD: {exc}. Use per-sample-gradient "
            "friendly layers (GroupNorm instead of BatchNorm)"
        ) from exc


def seeds(seed: int | None) -> tuple[int, int]:
    """(sampling seed, noise seed) derived from ``seed``; None draws a fresh OS-random one.

    Args:
        seed: an integer ≥ 0, or None.
    """
    if seed is None:
        seed = secrets.randbits(63)
    elif isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise PrivacyError(f"seed must be an integer ≥ 0 or None, got {seed!r}")
    sampling, noise = np.random.SeedSequence(seed).generate_state(2, dtype=np.uint64)
    return int(sampling), int(noise)


class PrivateRun:
    """A deep copy of ``module`` trained with DP-SGD: the linear-clipping step or Opacus.

    Args:
        module: the model to copy (not modified).
        x: all of the slave's inputs, records first.
        y: the matching labels.
        settings: the DP-SGD plan (σ, C, B, lr, momentum).
        q: the Poisson sample rate.
        seed: see :func:`seeds`.
        grad_sample_mode: one of :data:`GRAD_SAMPLE_MODES`.
    """

    def __init__(
        self,
        module: nn.Module,
        x: torch.Tensor,
        y: torch.Tensor,
        settings: DPSettings,
        q: float,
        seed: int | None,
        grad_sample_mode: str,
    ) -> None:
        if grad_sample_mode not in GRAD_SAMPLE_MODES:
            raise PrivacyError(
                f"grad_sample_mode must be one of {GRAD_SAMPLE_MODES}, got {grad_sample_mode!r}"
            )
        sampling_seed, noise_seed = seeds(seed)
        self.x, self.y, self.q = x, y, q
        self.sampler = torch.Generator().manual_seed(sampling_seed)
        self.module = copy.deepcopy(module)
        self.module.train()
        if any(isinstance(m, _BatchNorm) for m in self.module.modules()):
            raise PrivacyError(
                "this model cannot be trained with DP-SGD: BatchNorm mixes the records of a "
                "batch. Use per-sample-gradient friendly layers (GroupNorm instead of BatchNorm)"
            )
        optimizer = torch.optim.SGD(
            self.module.parameters(), lr=settings.lr, momentum=settings.momentum
        )
        noise = torch.Generator().manual_seed(noise_seed)
        expected = settings.expected_batch(len(y))
        self.fast: LinearClippingStep | None = None
        if grad_sample_mode in ("auto", "linear"):
            if supports(self.module, x[:1]):
                self.fast = LinearClippingStep(
                    self.module,
                    optimizer,
                    noise_multiplier=float(settings.noise_multiplier),
                    max_grad_norm=float(settings.max_grad_norm),
                    expected_batch=expected,
                    generator=noise,
                )
                self.wrapped = self.module
                return
            if grad_sample_mode == "linear":
                raise PrivacyError(
                    "grad_sample_mode='linear' needs a model whose trainable layers are all "
                    "nn.Linear, each called once on a (batch, features) input; use "
                    "grad_sample_mode='auto' or an Opacus mode ('ew', 'hooks')"
                )
            grad_sample_mode = "ew"
        loader = DataLoader(TensorDataset(x, y), batch_size=expected)
        with _quiet(), _opacus_errors():
            engine = PrivacyEngine(accountant="prv", secure_mode=False)
            self.wrapped, dp_optimizer, _ = engine.make_private(
                module=self.module,
                optimizer=optimizer,
                data_loader=loader,
                noise_multiplier=float(settings.noise_multiplier),
                max_grad_norm=float(settings.max_grad_norm),
                poisson_sampling=False,  # batches() samples with rate q exactly
                noise_generator=noise,
                grad_sample_mode=grad_sample_mode,
            )
        # make_private derives the expected batch size from len(loader); use B exactly.
        dp_optimizer.expected_batch_size = expected
        self.optimizer: DPOptimizer = dp_optimizer

    def batches(self, epochs: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Poisson batches: ``epochs × int(1/q)`` of them (some may be empty).

        Each record joins a batch independently with probability q: the draws of Opacus's
        ``UniformWithReplacementSampler`` (``torch.rand(N) < q`` on the sampling generator),
        kept as an index tensor instead of a Python list.
        """
        n = len(self.y)
        per_epoch = max(1, int(1.0 / self.q))
        for _ in range(epochs * per_epoch):
            index = (torch.rand(n, generator=self.sampler) < self.q).nonzero().reshape(-1)
            yield self.x.index_select(0, index), self.y.index_select(0, index)

    def step(
        self,
        loss_fn: LossFn,
        xb: torch.Tensor,
        yb: torch.Tensor,
        *,
        apply: bool = True,
    ) -> float:
        """One DP-SGD step (clip, noise, average over B); returns the batch loss (NaN if empty)."""
        if self.fast is not None:
            return self.fast.step(loss_fn, xb, yb, apply=apply)
        self.optimizer.zero_grad(set_to_none=True)
        if xb.shape[0] == 0:
            # An empty Poisson batch still releases noise: the step adds N(0, σ²C²)/B alone.
            # Empty per-sample gradients make the DP optimizer do exactly that, in every mode.
            for p in self.module.parameters():
                if p.requires_grad:
                    setattr(p, "grad_sample", torch.zeros((0, *p.shape), dtype=p.dtype))  # noqa: B010
            value = math.nan
        else:
            loss = loss_fn(self.wrapped(xb), yb, xb)
            value = float(loss.detach())
            with _quiet():
                loss.backward()
        if apply:
            self.optimizer.step()
        else:
            self.optimizer.pre_step()
        return value

    def close(self) -> None:
        """Remove the hooks from the (discarded) copy."""
        if self.fast is not None:
            self.fast.close()
            return
        remove = getattr(self.wrapped, "_close", None)
        if callable(remove):
            remove()


class PlainRun:
    """Plain mini-batch SGD on a deep copy of ``module``: no clipping, no noise.

    The same interface as :class:`PrivateRun`: ``epochs × int(1/q)`` batches of
    ``B = settings.expected_batch`` records each, drawn without replacement from a fresh
    permutation every epoch (the usual non-private loader).

    Args: as for :class:`PrivateRun` (no ``grad_sample_mode``).
    """

    def __init__(self, module: nn.Module, x: torch.Tensor, y: torch.Tensor,
                 settings: DPSettings, q: float, seed: int | None) -> None:
        sampling_seed, _ = seeds(seed)
        self.x, self.y, self.q = x, y, q
        self.batch = settings.expected_batch(len(y))
        self.sampler = torch.Generator().manual_seed(sampling_seed)
        self.module = copy.deepcopy(module)
        self.module.train()
        self.optimizer = torch.optim.SGD(self.module.parameters(), lr=settings.lr,
                                         momentum=settings.momentum)

    def batches(self, epochs: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """``int(1/q)`` disjoint batches of B records per epoch, a new permutation each."""
        n = len(self.y)
        per_epoch = max(1, int(1.0 / self.q))
        for _ in range(epochs):
            order = torch.randperm(n, generator=self.sampler)
            for k in range(per_epoch):
                index = order[k * self.batch : (k + 1) * self.batch]
                yield self.x.index_select(0, index), self.y.index_select(0, index)

    def step(self, loss_fn: LossFn, xb: torch.Tensor, yb: torch.Tensor, *,
             apply: bool = True) -> float:
        """One SGD step on the batch's mean loss; with ``apply=False`` only the gradient."""
        self.optimizer.zero_grad(set_to_none=True)
        loss = loss_fn(self.module(xb), yb, xb)
        loss.backward()
        if apply:
            self.optimizer.step()
        return float(loss.detach())

    def close(self) -> None:
        """Nothing to release (no hooks); for symmetry with :class:`PrivateRun`."""
