"""The task a master sends each slave at the start of a round attempt.

A task names the model by architecture and digest (its parameters follow as a binary
message: a slave never runs code it receives), carries the federation's training plan, and,
under a masked protection, the round's public secure-aggregation settings.
"""

from __future__ import annotations

from secure_fed.config.settings import MasterConfig
from secure_fed.config.tasks import DEFAULT_TASK, task_facts
from secure_fed.master.distributed_plan import distributed_plan
from secure_fed.models.package import ModelPackage
from secure_fed.privacy.evaluation import statistic_for_task
from secure_fed.protocol import coordinator as co
from secure_fed.protocol.messages import EvaluationPlan, ModelHeader, Plan, SecAggTask, Task


def round_task(start: co.StartRound, config: MasterConfig, package: ModelPackage,
               student: ModelPackage | None, secagg: SecAggTask | None, *, vector_size: int,
               chunks: int) -> Task:
    """The task of a round attempt; the parameters of ``package`` (and ``student``) follow it
    as binary messages."""
    return Task(
        round=start.round, attempt=start.attempt, nonce=start.nonce,
        deadline_s=start.deadline_s,
        model=model_header(package),
        plan=training_plan(config),
        student=model_header(student) if student is not None else None,
        secagg=secagg,
        vector_size=vector_size, chunks=chunks,
    )


def training_plan(config: MasterConfig) -> Plan:
    """The training plan every task of the federation carries."""
    training = config.training
    distill = training.mode == "distill"
    facts = task_facts(federation_task(config))
    return Plan(mode=training.mode, epochs=training.epochs,
                batch_size=training.batch_size, lr=training.lr,
                momentum=training.momentum, max_grad_norm=training.max_grad_norm,
                epsilon=training.epsilon, delta=training.delta,
                rounds_total=config.rounds,
                temperature=training.distill.temperature if distill else None,
                alpha=training.distill.alpha if distill else None, dp=training.dp,
                data_schema=config.data_schema,
                distributed=distributed_plan(training, len(config.slaves)),
                evaluation=(EvaluationPlan(statistic=statistic_for_task(facts.name).kind,
                                           fraction=training.evaluation_fraction,
                                           epsilon_share=training.evaluation_epsilon_share)
                            if training.federated_evaluation and training.dp else None),
                task=facts.name, loss=facts.loss, metric=facts.metric)


def federation_task(config: MasterConfig) -> str:
    """The task the federation trains: its schema's, or multi-class without a schema."""
    return config.data_schema.task if config.data_schema is not None else DEFAULT_TASK


def model_header(package: ModelPackage) -> ModelHeader:
    """What a task says about a model whose parameters follow as a binary message."""
    return ModelHeader(architecture=package.architecture, kwargs=package.kwargs,
                       digest=package.digest, params_bytes=len(package.params))
