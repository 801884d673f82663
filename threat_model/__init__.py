"""Threat-model evidence of secure_fed: runnable attack demonstrations (see THREAT_MODEL.md)."""
