"""Typed configuration: TOML in, validated pydantic models out; the federation's data schema."""

from secure_fed.config.schema import DataSchema, FeatureSpec, load_schema, schema_from_csv_header
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
    "DataSchema",
    "FeatureSpec",
    "EncryptionSettings",
    "EvaluationSettings",
    "LimitSettings",
    "MasterConfig",
    "ModelSpec",
    "SlaveConfig",
    "TrainingPlanSettings",
    "load_master_config",
    "load_schema",
    "load_slave_config",
    "schema_from_csv_header",
    "write_config",
]
