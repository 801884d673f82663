"""secure_fed.transport."""
