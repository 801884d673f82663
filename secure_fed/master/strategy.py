"""Server optimizers: how the master turns the decrypted average update into a new model.

Each round the master decrypts one vector, the weighted average of what the slaves returned,
and turns it into a *pseudo-gradient* ``Δ`` (the direction the slaves would move the model:
the average parameter change in ``delta`` and ``distill`` modes, ``−lr × average gradient``
in ``gradient`` mode). A server optimizer maps ``Δ`` to the step added to the parameters.
Following Reddi et al., "Adaptive Federated Optimization" (ICLR 2021), Algorithm 2:

* **FedAvg**: ``x ← x + η·Δ`` (η = 1 is plain federated averaging).
* **FedAdam**: ``m ← β₁m + (1−β₁)Δ``, ``v ← β₂v + (1−β₂)Δ²``, ``x ← x + η·m / (√v + τ)``.
* **FedYogi**: as FedAdam with ``v ← v − (1−β₂)·Δ²·sign(v − Δ²)``.

``m`` starts at 0 and ``v`` at τ² (the paper's ``v₋₁ ≥ τ²``), without bias correction, as in
the paper. The state (``m``, ``v``, the step count) is part of each checkpoint, so a master
that restarts continues with the same moments it would have had.

The optimizers see only the decrypted average, never an individual update; they are plain
NumPy and know nothing of encryption, the network or torch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np

from secure_fed.errors import ConfigError

ServerOptimizerName = Literal["fedavg", "fedadam", "fedyogi"]
SERVER_OPTIMIZERS: tuple[str, ...] = ("fedavg", "fedadam", "fedyogi")
DEFAULT_SERVER_LR: dict[str, float] = {"fedavg": 1.0, "fedadam": 0.03, "fedyogi": 0.03}
"""η used when the configuration leaves ``server_lr`` unset."""


@dataclass(frozen=True)
class ServerOptimizerSettings:
    """Hyper-parameters of a server optimizer.

    Args:
        name: ``fedavg``, ``fedadam`` or ``fedyogi``.
        lr: η, the server learning rate.
        beta1: β₁, decay of the first moment (adaptive optimizers only).
        beta2: β₂, decay of the second moment (adaptive optimizers only).
        tau: τ, the adaptivity floor added to √v (adaptive optimizers only).
    """

    name: str = "fedavg"
    lr: float = 1.0
    beta1: float = 0.9
    beta2: float = 0.99
    tau: float = 1e-3


class ServerOptimizer:
    """Turns pseudo-gradients into parameter steps; holds the optimizer state.

    Args:
        settings: the optimizer and its hyper-parameters.
        size: number of parameters of the model it updates.
    """

    def __init__(self, settings: ServerOptimizerSettings, size: int) -> None:
        if settings.name not in SERVER_OPTIMIZERS:
            raise ConfigError(f"server optimizer {settings.name!r} is unknown; choose one of "
                              f"{', '.join(SERVER_OPTIMIZERS)}")
        if not settings.lr > 0:
            raise ConfigError(f"server learning rate must be > 0, got {settings.lr}")
        if settings.name != "fedavg":
            if not (0 <= settings.beta1 < 1 and 0 <= settings.beta2 < 1):
                raise ConfigError(f"β₁ and β₂ must lie in [0, 1), got {settings.beta1}, "
                                  f"{settings.beta2}")
            if not settings.tau > 0:
                raise ConfigError(f"τ must be > 0, got {settings.tau}")
        self.settings = settings
        self.size = int(size)
        self.steps = 0
        self.m = np.zeros(self.size, dtype=np.float64)
        self.v = np.full(self.size, settings.tau ** 2, dtype=np.float64)

    @property
    def adaptive(self) -> bool:
        """Whether the optimizer keeps moments (FedAdam, FedYogi)."""
        return self.settings.name != "fedavg"

    def step(self, pseudo_gradient: np.ndarray) -> np.ndarray:
        """The step to add to the parameters for pseudo-gradient Δ (and update the state)."""
        delta = np.asarray(pseudo_gradient, dtype=np.float64)
        if delta.shape != (self.size,):
            raise ConfigError(f"pseudo-gradient has shape {delta.shape}, the model has "
                              f"{self.size} parameters")
        s = self.settings
        self.steps += 1
        if not self.adaptive:
            return (s.lr * delta).astype(np.float32)
        self.m = s.beta1 * self.m + (1.0 - s.beta1) * delta
        square = delta * delta
        if s.name == "fedadam":
            self.v = s.beta2 * self.v + (1.0 - s.beta2) * square
        else:
            self.v = self.v - (1.0 - s.beta2) * square * np.sign(self.v - square)
        return (s.lr * self.m / (np.sqrt(self.v) + s.tau)).astype(np.float32)

    def state(self) -> dict[str, np.ndarray]:
        """The state to checkpoint (empty for FedAvg, which has none)."""
        if not self.adaptive:
            return {}
        return {"m": self.m.copy(), "v": self.v.copy(),
                "steps": np.array([self.steps], dtype=np.int64)}

    def load_state(self, state: dict[str, np.ndarray]) -> None:
        """Restore a state written by :meth:`state` (refuses one of another shape)."""
        if not self.adaptive:
            return
        try:
            m, v, steps = state["m"], state["v"], state["steps"]
        except KeyError as exc:
            raise ConfigError(f"the checkpoint lacks the {self.settings.name} state {exc}; "
                              "it was written with another server optimizer") from exc
        if m.shape != (self.size,) or v.shape != (self.size,):
            raise ConfigError(f"the checkpointed {self.settings.name} state has "
                              f"{m.shape[0]} values, the model has {self.size} parameters")
        if not (np.all(np.isfinite(m)) and np.all(np.isfinite(v)) and np.all(v >= 0)):
            raise ConfigError("the checkpointed optimizer state holds invalid values")
        self.m = m.astype(np.float64)
        self.v = v.astype(np.float64)
        self.steps = int(steps.reshape(-1)[0])
