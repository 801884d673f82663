"""secure_fed.master."""
