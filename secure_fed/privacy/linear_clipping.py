"""DP-SGD steps for models whose trainable layers are all ``nn.Linear``: ghost norms, one backward.

The mechanism is Opacus's ``DPOptimizer`` step, term for term: with ``g_i`` the gradient of
record i's loss, clip factor ``f_i = min(1, C / (‖g_i‖₂ + 1e-6))`` (``‖g_i‖`` over all trainable
parameters together), gradient ``(Σ_i f_i g_i + z) / B``, and nothing added when σ = 0. The
noise z is the run's :class:`~secure_fed.privacy.noise.GridGaussian` (the discrete Gaussian
on a fine grid, standard deviation ≈ σC, one draw for all parameters in the optimizer's
order), exactly as the Opacus path of :mod:`secure_fed.privacy.private_run` adds it. An empty
batch gives ``z / B``. The update is then the wrapped optimizer's own ``step``.

Only the way ``‖g_i‖`` and ``Σ f_i g_i`` are computed differs. For a Linear layer
``y = a Wᵀ + bias`` applied once to a 2-D batch ``a`` (records × features), with
``b_i = ∂ℓ_i/∂y_i`` the per-sample gradient of W is the outer product ``b_i a_iᵀ``, so
``‖∂ℓ_i/∂W‖ = ‖b_i‖·‖a_i‖``, ``∂ℓ_i/∂bias = b_i`` and ``Σ f_i ∂ℓ_i/∂W = (f∘b)ᵀ a`` (the
"ghost norm" identity of Opacus's own ``compute_linear_norm_sample``). One
backward pass to the layers' outputs gives every ``b``; no per-sample gradient is ever stored,
so memory stays O(batch × width) and the step costs a few tensor operations per layer instead
of Opacus's per-parameter bookkeeping. ``tests/test_privacy_training.py`` checks the result
against Opacus's ``hooks`` mode (σ = 0: same update to 1e-6; σ > 0: the same noise draws for
the same seed).

A model qualifies when every module holding trainable parameters is exactly ``nn.Linear``,
each called once per forward on a 2-D input whose first dimension is the batch, with no
parameter shared between layers (:func:`supports`). Anything else goes through Opacus.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from secure_fed.errors import PrivacyError
from secure_fed.privacy.noise import StepRelease

LossFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def _trainable_linears(module: nn.Module) -> list[nn.Linear] | None:
    """The Linear layers holding trainable parameters, or None if another module holds some."""
    layers: list[nn.Linear] = []
    seen: set[int] = set()
    for sub in module.modules():
        own = [p for p in sub.parameters(recurse=False) if p.requires_grad]
        if not own:
            continue
        if type(sub) is not nn.Linear or any(id(p) in seen for p in own):
            return None
        seen.update(id(p) for p in own)
        layers.append(sub)
    return layers


def supports(module: nn.Module, sample: torch.Tensor) -> bool:
    """Whether :class:`LinearClippingStep` can train ``module`` (see the module doc).

    Args:
        module: the model, in training mode.
        sample: a few real input records, used for one forward pass without gradients to see
            how each Linear layer is called.
    """
    layers = _trainable_linears(module)
    if not layers:
        return False
    calls: dict[int, list[int]] = {id(layer): [] for layer in layers}

    def record(layer: nn.Module, args: tuple[torch.Tensor, ...], _out: torch.Tensor) -> None:
        arg = args[0] if len(args) == 1 and isinstance(args[0], torch.Tensor) else None
        ok = arg is not None and arg.dim() == 2 and arg.shape[0] == sample.shape[0]
        calls[id(layer)].append(1 if ok else 0)

    handles = [layer.register_forward_hook(record) for layer in layers]
    try:
        with torch.no_grad():
            module(sample)
    finally:
        for handle in handles:
            handle.remove()
    return all(seen == [1] for seen in calls.values())


class LinearClippingStep:
    """Clip, noise and average the gradient of one Poisson batch of a Linear-only model.

    Args:
        module: the model (forward hooks are added; call :meth:`close` to remove them).
        optimizer: a plain torch optimizer over ``module``'s parameters.
        max_grad_norm: C.
        expected_batch: B, the divisor of the noisy sum.
        noise: the noise of σ > 0 for exactly the optimizer's trainable parameters, or None
            for σ = 0 (no noise: not private).
    """

    def __init__(
        self,
        module: nn.Module,
        optimizer: torch.optim.Optimizer,
        *,
        max_grad_norm: float,
        expected_batch: int,
        noise: StepRelease | None,
    ) -> None:
        layers = _trainable_linears(module)
        if not layers:
            raise PrivacyError(
                "grad_sample_mode='linear' needs a model whose trainable layers are all "
                "nn.Linear; use grad_sample_mode='auto' or an Opacus mode ('ew', 'hooks')"
            )
        self.module = module
        self.optimizer = optimizer
        self.layers = layers
        self.max_grad_norm = float(max_grad_norm)
        self.expected_batch = expected_batch
        self.noise = noise
        self.params = [
            p for group in optimizer.param_groups for p in group["params"] if p.requires_grad
        ]
        if noise is not None and noise.dimension != sum(p.numel() for p in self.params):
            raise PrivacyError("the noise must be set up for the optimizer's trainable parameters")
        owned = {id(p) for layer in layers for p in layer.parameters() if p.requires_grad}
        if {id(p) for p in self.params} != owned:
            raise PrivacyError("the optimizer must train exactly the model's trainable parameters")
        self._slot = {id(layer): i for i, layer in enumerate(layers)}
        self._trained = [
            (layer.weight.requires_grad, layer.bias is not None and layer.bias.requires_grad)
            for layer in layers
        ]
        self._inputs: list[torch.Tensor | None] = [None] * len(layers)
        self._outputs: list[torch.Tensor | None] = [None] * len(layers)
        self._batch = 0
        self._handles: list[RemovableHandle] = [
            layer.register_forward_hook(self._capture) for layer in layers
        ]

    def _capture(self, layer: nn.Module, args: tuple[torch.Tensor, ...], out: torch.Tensor) -> None:
        i = self._slot[id(layer)]
        a = args[0]
        if self._inputs[i] is not None or a.dim() != 2 or a.shape[0] != self._batch:
            call = 2 if self._inputs[i] is not None else 1
            raise PrivacyError(
                f"{layer} got input of shape {tuple(a.shape)} (call {call} in this forward "
                f"pass); grad_sample_mode='linear' needs each Linear called once on a "
                f"({self._batch}, features) batch. Use grad_sample_mode='auto', 'ew' or 'hooks'"
            )
        self._inputs[i] = a.detach()
        self._outputs[i] = out

    def _clipped_sums(self, loss: torch.Tensor, n: int) -> dict[int, torch.Tensor]:
        """``Σ_i f_i g_i`` (÷ B when there is no noise) per trainable parameter, by ``id``."""
        outputs = [o for o in self._outputs if o is not None]
        inputs = [a for a in self._inputs if a is not None]
        if len(outputs) != len(self.layers):
            raise PrivacyError("a trainable Linear layer was not used in the forward pass")
        # Backprops of the summed loss (the mean loss's gradient times n, as Opacus scales them).
        scale = torch.full_like(loss, float(n))
        backprops = torch.autograd.grad(loss, outputs, grad_outputs=scale, allow_unused=True)
        total: torch.Tensor | None = None
        for (weight, bias), a, b in zip(self._trained, inputs, backprops, strict=True):
            if b is None:
                continue
            squared = torch.linalg.vecdot(b, b)  # ‖∂ℓ_i/∂bias‖² = ‖b_i‖²
            if weight:  # ‖∂ℓ_i/∂W‖² = ‖b_i‖²·‖a_i‖²
                a2 = torch.linalg.vecdot(a, a)
                squared = torch.addcmul(squared, squared, a2) if bias else squared * a2
            total = squared if total is None else total + squared
        if total is None:
            return {}
        # A record whose gradient is not finite (a model crafted to overflow on it) counts as
        # zero, a contribution of norm 0 ≤ C: otherwise its NaN would spread to the whole sum
        # and reveal, without noise, whether it was sampled.
        finite = torch.isfinite(total)
        total = torch.where(finite, total, torch.zeros_like(total))
        # f_i = min(1, C / (‖g_i‖ + 1e-6)); without noise the 1/B of the average folded in
        # (with noise it comes after the noise, as in Opacus).
        factor = (self.max_grad_norm / (total.sqrt_() + 1e-6)).clamp_(max=1.0)
        if self.noise is None:
            factor.mul_(1.0 / self.expected_batch)
        weights = factor.unsqueeze(1)
        keep = finite.unsqueeze(1)
        sums: dict[int, torch.Tensor] = {}
        for layer, (weight, bias), a, b in zip(
            self.layers, self._trained, inputs, backprops, strict=True
        ):
            if b is None:
                continue
            if not bool(finite.all()):
                a = torch.where(keep, a, torch.zeros_like(a))
                b = torch.where(keep, b, torch.zeros_like(b))
            fb = b * weights
            if weight:
                sums[id(layer.weight)] = torch.mm(fb.t(), a)
            if bias:
                sums[id(layer.bias)] = fb.sum(0)
        return sums

    def step(self, loss_fn: LossFn, xb: torch.Tensor, yb: torch.Tensor, *, apply: bool) -> float:
        """One DP-SGD step on a batch (possibly empty); returns its mean loss (NaN if empty).

        Args:
            loss_fn: ``(outputs, labels, inputs) → mean loss``.
            xb: the batch's inputs (records first).
            yb: the batch's labels.
            apply: run the optimizer's step; if False only set ``p.grad`` (FedSGD).
        """
        n = int(xb.shape[0])
        sums: dict[int, torch.Tensor] = {}
        value = math.nan
        if n > 0:
            self._batch = n
            try:
                loss = loss_fn(self.module(xb), yb, xb)
                sums = self._clipped_sums(loss, n)
            finally:
                self._inputs = [None] * len(self.layers)
                self._outputs = [None] * len(self.layers)
            value = float(loss.detach())
        grads = [sums[id(p)] if id(p) in sums else torch.zeros_like(p) for p in self.params]
        if self.noise is not None:
            grads = self.noise.release(grads, divisor=self.expected_batch)
        for p, grad in zip(self.params, grads, strict=True):
            p.grad = grad
        if apply:
            self.optimizer.step()
        return value

    def close(self) -> None:
        """Remove the forward hooks."""
        for handle in self._handles:
            handle.remove()
        self._handles = []
