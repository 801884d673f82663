"""secure_fed.crypto."""
