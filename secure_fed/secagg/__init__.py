"""secure_fed.secagg: secure aggregation by pairwise masking on the ring of the BFV plain modulus.

Masks and Shamir shares, the ring format of masked updates and their running sum, the
state machines of both roles with their messages and settings, and the master's round
driver. Nothing here knows about training or the network (see docs/secagg.md).
"""
