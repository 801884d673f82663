"""secure_fed.cli."""
