"""One DP-SGD run on a private copy of a model: Poisson batches and clipped, noised steps.

:class:`PlainRun` is its non-private counterpart (shuffled batches, plain SGD) for plans that
turn DP off (baselines only; see ``TrainingPlanSettings.dp``).

:class:`PrivateRun` is the machinery behind :mod:`secure_fed.privacy.training`: it deep-copies
the caller's module (which is never modified), draws Poisson batches with rate q exactly, and
runs each step either with :class:`~secure_fed.privacy.linear_clipping.LinearClippingStep` (the
default for models whose trainable layers are all ``nn.Linear``) or with a fresh Opacus
``PrivacyEngine`` (``make_private`` with the chosen ``grad_sample_mode``, its ``add_noise``
replaced by ours). Both release ``(Σ clip_C(g_i) + z) / B`` per step, an empty batch included,
z the same discrete Gaussian on a fine grid (:class:`~secure_fed.privacy.noise.GridGaussian`).

Randomness: one 32-byte key (:func:`run_key`: fresh from :mod:`secrets` unless a test seed is
given) keys two independent ChaCha20 streams (:class:`~secure_fed.privacy.noise.RandomStream`),
one for the Poisson sampling and one for the noise, which is the discrete Gaussian on a fine
grid of :class:`~secure_fed.privacy.noise.GridGaussian` in both kinds of step; see
:mod:`secure_fed.privacy.noise` for the privacy argument and
:mod:`secure_fed.privacy.training` for what a fixed seed implies.
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
from opacus.optimizers.optimizer import _check_processed_flag, _mark_as_processed
from opacus.validators.errors import UnsupportedModuleError
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.utils.data import DataLoader, TensorDataset

from secure_fed.errors import PrivacyError
from secure_fed.privacy.linear_clipping import LinearClippingStep, supports
from secure_fed.privacy.noise import GridGaussian, StepRelease
from secure_fed.privacy.random_stream import SEED_BYTES, RandomStream, seed_from_int

if TYPE_CHECKING:
    from secure_fed.privacy.settings import DPSettings

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


#: Stream numbers of a run's key: the Poisson sampling and the noise never share words.
SAMPLING_STREAM = 0
NOISE_STREAM = 1


def run_key(seed: int | None) -> bytes:
    """The 32-byte key of a run's random streams: fresh from :mod:`secrets` when ``seed`` is None.

    Args:
        seed: None (every real run), or an integer ≥ 0 for a reproducible test or benchmark,
            which makes the noise predictable to anyone who knows it
            (:func:`~secure_fed.privacy.noise.seed_from_int`).
    """
    if seed is None:
        return secrets.token_bytes(SEED_BYTES)
    return seed_from_int(seed)


def poisson_batch(stream: RandomStream, records: int, q: float) -> torch.Tensor:
    """Indices of one Poisson batch: each record joins independently with probability q.

    Args:
        stream: the run's sampling stream (one 64-bit word per record).
        records: N.
        q: the sample rate, 0 < q ≤ 1 (rounded down by at most 2⁻⁶⁴).
    """
    return torch.from_numpy(np.flatnonzero(stream.bernoulli(records, q)))


def _add_grid_noise(optimizer: DPOptimizer, noise: StepRelease) -> Callable[[], None]:
    """A replacement for ``optimizer.add_noise`` that adds our noise instead of torch.normal.

    Relied on (opacus 1.6, ``opacus/optimizers/optimizer.py``): ``DPOptimizer.pre_step`` runs
    ``clip_and_accumulate`` (the clipped sum in ``p.summed_grad``), then ``add_noise``, then
    ``scale_grad`` (÷ B); ``add_noise`` checks ``p.summed_grad`` is unprocessed, sets
    ``p.grad = (p.summed_grad + _generate_noise(σC, p.summed_grad)).view_as(p)`` for each of
    ``optimizer.params`` and marks it processed. This does the same with
    :meth:`GridGaussian.release` in place of the sum with ``_generate_noise``: clipping and
    scaling stay Opacus's.
    """

    def add_noise() -> None:
        params = optimizer.params
        for p in params:
            _check_processed_flag(p.summed_grad)
        released = noise.release([p.summed_grad for p in params])
        for p, grad in zip(params, released, strict=True):
            p.grad = grad.view_as(p)
            _mark_as_processed(p.summed_grad)

    return add_noise


def _zero_non_finite_samples(params: list[nn.Parameter]) -> None:
    """Set to zero the per-sample gradients of every record with a value that is not finite.

    Opacus clips ``grad_sample`` by its per-sample norms; a NaN or an infinity (a model crafted
    to overflow on one record) survives clipping and would spread to the whole sum, telling
    without noise whether that record was sampled. A zero contribution has norm 0 ≤ C, so the
    sensitivity argument is unchanged.
    """
    samples = [g for p in params if isinstance(g := getattr(p, "grad_sample", None), torch.Tensor)]
    if not samples or samples[0].shape[0] == 0:
        return
    finite = torch.ones(samples[0].shape[0], dtype=torch.bool, device=samples[0].device)
    for g in samples:
        finite &= torch.isfinite(g.reshape(g.shape[0], -1)).all(dim=1)
    if bool(finite.all()):
        return
    for g in samples:
        g[~finite] = 0


class PrivateRun:
    """A deep copy of ``module`` trained with DP-SGD: the linear-clipping step or Opacus.

    Args:
        module: the model to copy (not modified).
        x: all of the slave's inputs, records first.
        y: the matching labels.
        settings: the DP-SGD plan (σ, C, B, lr, momentum).
        q: the Poisson sample rate.
        seed: see :func:`run_key`.
        grad_sample_mode: one of :data:`GRAD_SAMPLE_MODES`.
        records: the public record count q was derived from (``None``: ``len(y)``); the
            noisy sum is divided by the expected batch ``min(B, records)``, never by a count
            that only the slave knows.
        release: what each step hands its clipped sums to instead of the run's own noise
            (``None``: the :class:`~secure_fed.privacy.noise.GridGaussian` of σ, or nothing
            for σ = 0); the distributed mechanism passes a
            :class:`~secure_fed.privacy.noise.SumCapture`.
        device: where the copy, the batches and the clipping live (default the CPU; see
            :mod:`secure_fed.privacy.device`); the noise is drawn on the CPU and added there.
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
        records: int | None = None,
        release: StepRelease | None = None,
        device: torch.device | None = None,
    ) -> None:
        if grad_sample_mode not in GRAD_SAMPLE_MODES:
            raise PrivacyError(
                f"grad_sample_mode must be one of {GRAD_SAMPLE_MODES}, got {grad_sample_mode!r}"
            )
        key = run_key(seed)
        self.device = torch.device("cpu") if device is None else torch.device(device)
        self.x, self.y, self.q = x.to(self.device), y.to(self.device), q
        self.sampler = RandomStream(key, SAMPLING_STREAM)
        self.module = copy.deepcopy(module).to(self.device)
        self.module.train()
        if any(isinstance(m, _BatchNorm) for m in self.module.modules()):
            raise PrivacyError(
                "this model cannot be trained with DP-SGD: BatchNorm mixes the records of a "
                "batch. Use per-sample-gradient friendly layers (GroupNorm instead of BatchNorm)"
            )
        optimizer = torch.optim.SGD(
            self.module.parameters(), lr=settings.lr, momentum=settings.momentum
        )
        expected = settings.expected_batch(len(y) if records is None else records)
        trainable = sum(p.numel() for p in self.module.parameters() if p.requires_grad)
        noise: StepRelease | None = release
        if release is None and settings.noise_multiplier > 0 and trainable > 0:
            noise = GridGaussian(
                float(settings.noise_multiplier),
                float(settings.max_grad_norm),
                int(trainable),
                RandomStream(key, NOISE_STREAM),
            )
        self.fast: LinearClippingStep | None = None
        if grad_sample_mode in ("auto", "linear"):
            if supports(self.module, self.x[:1]):
                self.fast = LinearClippingStep(
                    self.module,
                    optimizer,
                    max_grad_norm=float(settings.max_grad_norm),
                    expected_batch=expected,
                    noise=noise,
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
                grad_sample_mode=grad_sample_mode,
            )
        # make_private derives the expected batch size from len(loader); use B exactly.
        dp_optimizer.expected_batch_size = expected
        if noise is not None:
            setattr(dp_optimizer, "add_noise", _add_grid_noise(dp_optimizer, noise))  # noqa: B010
        self.optimizer: DPOptimizer = dp_optimizer

    def batches(self, epochs: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Poisson batches: ``epochs × int(1/q)`` of them (some may be empty).

        Each record joins a batch independently with probability q (:func:`poisson_batch`, on
        the run's ChaCha20 sampling stream: who is in a batch is as unpredictable as the noise,
        which the amplification by subsampling assumes).
        """
        n = len(self.y)
        per_epoch = max(1, int(1.0 / self.q))
        for _ in range(epochs * per_epoch):
            index = poisson_batch(self.sampler, n, self.q).to(self.x.device)
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
            # An empty Poisson batch still releases noise: the step releases the noise / B alone.
            # Empty per-sample gradients make the DP optimizer do exactly that, in every mode.
            for p in self.module.parameters():
                if p.requires_grad:
                    empty = torch.zeros((0, *p.shape), dtype=p.dtype, device=p.device)
                    setattr(p, "grad_sample", empty)  # noqa: B010
            value = math.nan
        else:
            loss = loss_fn(self.wrapped(xb), yb, xb)
            value = float(loss.detach())
            with _quiet():
                loss.backward()
            _zero_non_finite_samples([p for p in self.module.parameters() if p.requires_grad])
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
                 settings: DPSettings, q: float, seed: int | None,
                 device: torch.device | None = None) -> None:
        words = RandomStream(run_key(seed), SAMPLING_STREAM).words(1)
        self.device = torch.device("cpu") if device is None else torch.device(device)
        self.x, self.y, self.q = x.to(self.device), y.to(self.device), q
        self.batch = settings.expected_batch(len(y))
        self.sampler = torch.Generator().manual_seed(int(words[0] >> np.uint64(1)))
        self.module = copy.deepcopy(module).to(self.device)
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
                index = order[k * self.batch : (k + 1) * self.batch].to(self.x.device)
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
