"""secure_fed.config."""
