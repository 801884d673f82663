"""secure_fed.privacy."""
