"""Differential privacy: DP-SGD training, accounting, and each data source's budget ledger.

``training`` runs DP-SGD (Opacus's mechanism; ``linear_clipping`` is the one-backward path
for Linear-only models, ``private_run`` the per-run machinery) and returns the mechanism it
ran; ``accounting`` turns mechanism histories into ε at δ (``composition`` holds the
numerics); ``ledger`` persists a data source's history and enforces its budget.
"""
