"""secure_fed.models."""
