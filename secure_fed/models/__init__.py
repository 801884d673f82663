"""Model architectures resolved by name from a local registry, and model packages.

``registry`` builds architectures from validated keyword arguments; ``package`` moves
parameters as safetensors bytes bound to a SHA-256 digest, and flattens them to vectors.
"""
