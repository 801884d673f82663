"""secure_fed.slave."""
