"""secure_fed.data."""
