"""Typed configuration: TOML in, validated pydantic models out."""

from secure_fed.config.settings import (
    EncryptionSettings,
    EvaluationSettings,
    LimitSettings,
    MasterConfig,
    ModelSpec,
    SlaveConfig,
    TrainingPlanSettings,
    load_master_config,
    load_slave_config,
    write_config,
)

__all__ = [
    "EncryptionSettings",
    "EvaluationSettings",
    "LimitSettings",
    "MasterConfig",
    "ModelSpec",
    "SlaveConfig",
    "TrainingPlanSettings",
    "load_master_config",
    "load_slave_config",
    "write_config",
]
