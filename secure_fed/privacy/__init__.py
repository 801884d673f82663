"""Differential privacy: DP-SGD training, accounting, and each data source's budget ledger.

``training`` runs Opacus DP-SGD and returns the mechanism it ran; ``accounting`` turns
mechanism histories into ε at δ (``composition`` holds the numerics); ``ledger`` persists a
data source's history and enforces its budget.
"""
