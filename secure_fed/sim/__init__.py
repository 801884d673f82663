"""Many slaves on one machine or a Ray cluster: ``secure-fed simulate``.

The real master (round runner, aggregation, key holder, secure aggregation, audit log) runs in
one Ray actor; N real slaves (state machine, DP-SGD, encryption or masking, signatures) run as
event-loop tasks in a pool of K Ray actors, as Flower's Ray backend hosts many clients on few
actors. Their connections are carried by Ray actor calls (:mod:`secure_fed.sim.ray_channel`) or
by mutual-TLS websockets to the master on 127.0.0.1. Ray is an optional extra
(``pip install 'secure-fed[sim]'``); nothing outside this package imports it, and this package
imports it only when a simulation starts (:func:`secure_fed.sim.runtime.require_ray`).
"""
