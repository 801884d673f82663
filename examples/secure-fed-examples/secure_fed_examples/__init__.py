"""Example architectures for secure_fed, installed as a plugin package.

``resnet_small`` (:mod:`secure_fed_examples.resnet`) and ``text_lstm``
(:mod:`secure_fed_examples.text`) are registered in this package's ``pyproject.toml`` under the
entry-point group ``secure_fed.architectures``; secure_fed imports them only when a federation
builds them, and a slave trains them only when its data owner allows them.
"""
