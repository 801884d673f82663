"""Runnable attack demonstrations; each module is one command (see README.md here)."""
