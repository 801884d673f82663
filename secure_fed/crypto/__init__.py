"""secure_fed.crypto: homomorphic encryption of updates, key files, certificates.

Import from the submodules (``presets``, ``keys``, ``codec``, ``aggregator``, ``keyholder``):
this package deliberately imports none of them, so that importing the aggregator never loads
the key holder (see docs/codec.md).
"""
