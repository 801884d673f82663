"""secure_fed.audit."""
