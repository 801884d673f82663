"""secure_fed: federated training from private data.

A master holds a model; slaves train it on data the master never sees, under differential
privacy (Opacus DP-SGD), and return homomorphically encrypted updates (TenSEAL) over
mutual-TLS websockets. The master adds ciphertexts and decrypts only their sum.
"""

__version__ = "0.1.0"

from secure_fed.moved import install as _install_moved_modules

_install_moved_modules()
