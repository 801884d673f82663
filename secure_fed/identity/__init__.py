"""secure_fed.identity: who takes part in a federation.

The private CA, master and slave certificates, signatures, the revocation list, and the files
of the party bundles. Nothing here knows about rounds, models or homomorphic encryption.
"""
