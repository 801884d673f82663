"""secure_fed.protocol."""
