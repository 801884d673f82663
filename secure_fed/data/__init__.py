"""Datasets: the bundled demo sets, user CSV/NPZ files, and deterministic partitioning.

``datasets`` holds the in-memory :class:`~secure_fed.data.datasets.Dataset` and the bundled
loaders, ``partition`` the holdout and per-slave splits, ``tabular`` the user file loaders.
"""
