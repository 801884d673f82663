"""secure_fed.secagg: secure aggregation by pairwise masking on the ring of the BFV plain modulus.

Masks and Shamir shares, the ring format of masked updates and their running sum, the
state machines of both roles with their messages and settings, and the master's round
driver. Nothing here knows about training or the network (see docs/secagg.md).

The protocol is Bonawitz et al., CCS 2017. One :class:`SlaveSecAgg` per slave
(:mod:`secure_fed.secagg.slave_machine`) and one :class:`MasterSecAgg` per round
(:mod:`secure_fed.secagg.master_machine`) turn messages into messages; they never touch a
socket, a clock or a file. What both derive from the signed key advertisements is in
:mod:`secure_fed.secagg.peer_keys`. The driver (master and slave roles) carries the
messages, decides when a phase is over (everyone answered, or a deadline passed) and calls
the ``close_*`` methods of the master. Order of calls:

========================  ===========================================  ======================
phase                     slave u                                      master
========================  ===========================================  ======================
0 advertise keys          ``advertise()`` -> AdvertiseKeys             ``receive_advertisement``
                                                                       ``close_advertising()``
                                                                       -> KeyList to U1
0b graph seed (SecAgg+)   ``reveal_seed(KeyList)`` -> SeedReveal       ``receive_reveal``
                                                                       ``close_revealing()``
                                                                       -> SeedReveals to U1
1 share keys              ``share_keys(KeyList[, SeedReveals])``       ``receive_shares``
                          -> ShareKeys
                                                                       ``close_sharing()`` ->
                                                                       ShareDelivery per U2
2 masked input            ``mask(ShareDelivery, x)`` -> MaskedInput,   ``receive_masked``
                          payload bytes                                ``close_masking()`` ->
                                                                       UnmaskRequest to U3
3 unmasking               ``unmask(UnmaskRequest)`` -> UnmaskResponse  ``receive_unmask``
                                                                       ``finish()`` -> sum
========================  ===========================================  ======================

Every error is a :class:`~secure_fed.errors.ProtocolError` (a peer broke the protocol, or
too few slaves remain) or a :class:`~secure_fed.errors.CryptoError` (a ciphertext or share
does not check). A slave that raises is finished for the round (it drops its references
to its secrets) and must send nothing more; the master then counts it as dropped. A master
method that refuses a message leaves the master's state unchanged, except ``close_*`` and
``finish``, which abort the round when too few slaves remain. See docs/secagg.md for the
protocol and its guarantees.
"""

from secure_fed.secagg.master_machine import MasterSecAgg, MasterStage
from secure_fed.secagg.peer_keys import Signer, Verifier, derive_graph_seed
from secure_fed.secagg.slave_machine import SlaveSecAgg, SlaveStage

__all__ = ["MasterSecAgg", "MasterStage", "Signer", "SlaveSecAgg", "SlaveStage", "Verifier",
           "derive_graph_seed"]
