"""The master's side of each update mode: what the slaves' updates refer to, and how the
decrypted average becomes the next model.

The slaves' updates always refer to one *target* model: the master's own model in ``delta``
and ``gradient`` modes and in ``distill`` mode without a separate student architecture; the
federation's *student* model in ``distill`` mode when the plan names another architecture.
Each round the decrypted weighted average is turned into a pseudo-gradient Δ (the average
change; ``−lr × average gradient`` in ``gradient`` mode), the server optimizer
(:mod:`secure_fed.master.strategy`) maps Δ to a step, and the step is added to the target.
With a separate student, the master then distils the new student into its own model on its
proxy set: features of its hold-out split that no slave holds, used without labels.

:meth:`ModelUpdater.propose` computes the next models without changing anything;
:meth:`ModelUpdater.adopt` makes them current once the round's checkpoint is on disk, so a
round that fails after decryption leaves the optimizer state as it was.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from secure_fed.config.settings import DistillSettings, MasterConfig
from secure_fed.data.datasets import Dataset
from secure_fed.data.partition import split_holdout
from secure_fed.errors import ConfigError, SecureFedError
from secure_fed.master.strategy import (
    DEFAULT_SERVER_LR,
    ServerOptimizer,
    ServerOptimizerSettings,
)
from secure_fed.models.package import ModelPackage, add_to_parameters, parameters_vector
from secure_fed.models.registry import build_model


@dataclass(frozen=True)
class Proposal:
    """The models a round would commit, and the optimizer state that produced them."""

    package: ModelPackage
    student: ModelPackage | None
    optimizer: ServerOptimizer


def server_optimizer_settings(config: MasterConfig) -> ServerOptimizerSettings:
    """The server optimizer a master configuration asks for (default η per optimizer)."""
    t = config.training
    lr = t.server_lr if t.server_lr is not None else DEFAULT_SERVER_LR[t.server_optimizer]
    return ServerOptimizerSettings(name=t.server_optimizer, lr=lr, beta1=t.server_beta1,
                                   beta2=t.server_beta2, tau=t.server_tau)


def separate_student(config: MasterConfig) -> bool:
    """Whether the slaves train a student of another architecture than the master's model."""
    student = config.training.distill.student
    return (config.training.mode == "distill" and student is not None
            and student != config.model)


def initial_student(config: MasterConfig) -> ModelPackage | None:
    """The federation's initial student (seeded from the configuration), if it has one."""
    if not separate_student(config):
        return None
    spec = config.training.distill.student
    assert spec is not None  # separate_student checked it
    torch.manual_seed(config.seed + 1)
    return ModelPackage.from_module(spec.architecture, spec.kwargs,
                                    build_model(spec.architecture, **spec.kwargs))


def split_proxy(config: MasterConfig, holdout: Dataset | None) -> tuple[Dataset | None,
                                                                         Dataset | None]:
    """(evaluation set, proxy set) from the master's hold-out split.

    Only ``distill`` mode with a separate student needs a proxy set; the hold-out is then split
    (stratified, with the evaluation seed) into ``proxy_fraction`` for distillation and the rest
    for evaluation.
    """
    if not separate_student(config):
        return holdout, None
    if holdout is None:
        raise ConfigError("distill mode with a student architecture needs the master's proxy "
                          "set: set [evaluation] dataset to a bundled dataset no slave holds")
    fraction = config.training.distill.proxy_fraction
    proxy, evaluation = split_holdout(holdout, test_fraction=1.0 - fraction,
                                      seed=config.evaluation.seed)
    return evaluation, proxy


def distill_on_proxy(model: nn.Module, teacher: nn.Module, features: np.ndarray,
                     settings: DistillSettings, *, seed: int) -> None:
    """Train ``model`` in place to match ``teacher`` on unlabelled ``features``.

    Loss T²·KL(teacher/T ‖ model/T), plain SGD (the proxy set is the master's own data, so no
    DP is needed); deterministic for a given ``seed``.
    """
    generator = torch.Generator().manual_seed(seed)
    x = torch.from_numpy(np.ascontiguousarray(features, dtype=np.float32))
    t = settings.temperature
    teacher.eval()
    with torch.no_grad():
        soft = F.softmax(teacher(x) / t, dim=1)
    optimizer = torch.optim.SGD(model.parameters(), lr=settings.proxy_lr)
    model.train()
    for _ in range(settings.proxy_epochs):
        order = torch.randperm(x.shape[0], generator=generator)
        for start in range(0, x.shape[0], settings.proxy_batch_size):
            index = order[start:start + settings.proxy_batch_size]
            optimizer.zero_grad(set_to_none=True)
            log_probs = F.log_softmax(model(x[index]) / t, dim=1)
            loss = t * t * F.kl_div(log_probs, soft[index], reduction="batchmean")
            loss.backward()
            optimizer.step()
    model.eval()


class ModelUpdater:
    """Holds the master's model, the federation's student and the server optimizer.

    Args:
        config: the master's configuration (mode, server optimizer, distillation).
        package: the current master model (initial or from the last checkpoint).
        student: the current student (``distill`` mode with another architecture only).
        state: the server optimizer's state from the last checkpoint (empty at round 0).
        proxy: the master's proxy set (``distill`` mode with another architecture only).
    """

    def __init__(self, config: MasterConfig, package: ModelPackage,
                 student: ModelPackage | None, state: dict[str, np.ndarray],
                 proxy: Dataset | None) -> None:
        self.config = config
        self.package = package
        self.student = student
        if separate_student(config) and (student is None or proxy is None):
            raise ConfigError("distill mode with a student architecture needs the student "
                              "model and the master's proxy set")
        self.proxy = proxy
        self.vector_size = int(parameters_vector(self.target.build()).size)
        """Values of every update: the parameters of :attr:`target`."""
        self.optimizer = ServerOptimizer(server_optimizer_settings(config), self.vector_size)
        if state:
            self.optimizer.load_state(state)

    @property
    def target(self) -> ModelPackage:
        """The model the slaves' updates refer to (and whose size the update vector has)."""
        return self.student if self.student is not None else self.package

    def propose(self, average: np.ndarray, *, round_: int) -> Proposal:
        """The models after applying the decrypted weighted average of round ``round_``."""
        if not np.all(np.isfinite(average)):
            raise SecureFedError("the decrypted average holds non-finite values")
        training = self.config.training
        pseudo = -training.lr * average if training.mode == "gradient" else average
        optimizer = copy.deepcopy(self.optimizer)
        step = optimizer.step(pseudo)
        target = self.target
        model = target.build()
        add_to_parameters(model, step)
        updated = ModelPackage.from_module(target.architecture, target.kwargs, model)
        if self.student is None:
            return Proposal(updated, None, optimizer)
        assert self.proxy is not None  # checked in __init__
        master = self.package.build()
        distill_on_proxy(master, model, self.proxy.features, training.distill,
                         seed=self.config.seed + round_)
        package = ModelPackage.from_module(self.package.architecture, self.package.kwargs,
                                           master)
        return Proposal(package, updated, optimizer)

    def adopt(self, proposal: Proposal) -> None:
        """Make a proposal current (call once its checkpoint is committed)."""
        self.package = proposal.package
        self.student = proposal.student
        self.optimizer = proposal.optimizer
