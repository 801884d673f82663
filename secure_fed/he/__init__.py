"""secure_fed.he: homomorphic encryption of updates (TenSEAL BFV and CKKS).

Parameters and presets, the slave's codec, the aggregator (public context only) and the key
holder (secret key). Import from the submodules: this package imports none of them, so that
importing the aggregator never loads the key holder (see docs/codec.md).
"""
