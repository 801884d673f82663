"""One exception hierarchy for the whole project.

Every message says what was wrong, what was expected, and what to do about it.
"""

from __future__ import annotations


class SecureFedError(Exception):
    """Root of every error secure_fed raises on purpose."""


class ConfigError(SecureFedError):
    """A configuration file or option is missing, malformed or inconsistent."""


class ModelError(SecureFedError):
    """An architecture name is unknown, or a model package does not match its architecture."""


class CheckpointError(ModelError):
    """The master's checkpoints cannot be resumed from (none usable although the run has
    committed rounds)."""


class DataError(SecureFedError):
    """A dataset cannot be loaded or partitioned as asked."""


class PrivacyError(SecureFedError):
    """A differential-privacy setting is invalid (δ, sample rate, noise, budget)."""


class BudgetExhausted(PrivacyError):
    """Training as planned would take a data source past its privacy budget."""


class FederationBudgetExhausted(BudgetExhausted):
    """Another release would take one federation past the ε its plan grants (its figures are
    that federation's, not the data source's lifetime ones)."""


class CryptoError(SecureFedError):
    """Homomorphic-encryption parameters, keys or ciphertexts are invalid."""


class MalformedUpdate(CryptoError):
    """An encrypted update (or one chunk of it) from a slave was refused.

    Args:
        slave_id: the slave whose update was refused.
        chunk: index of the offending chunk, or ``None`` for the update as a whole.
        reason: what was wrong.
    """

    def __init__(self, slave_id: str, chunk: int | None, reason: str) -> None:
        where = f"chunk {chunk}" if chunk is not None else "update"
        super().__init__(f"update from slave '{slave_id}' refused ({where}): {reason}")
        self.slave_id = slave_id
        self.chunk = chunk
        self.reason = reason


class UnusableAggregate(CryptoError):
    """The key holder decrypted an aggregate that cannot be the sum of honest updates.

    Raised after decryption and before the aggregate is used: the round's attempt is refused.

    Args:
        check: the check that failed: ``"noise_budget"`` (a decrypted chunk had no invariant
            noise budget left, so its plaintext is meaningless) or ``"range"`` (a value of the
            weighted average lies outside [−clip, clip], which a weighted average of clipped
            updates cannot).
        reason: what was found, with the numbers.
    """

    def __init__(self, check: str, reason: str) -> None:
        super().__init__(reason)
        self.check = check
        self.reason = reason


class IdentityError(SecureFedError):
    """A certificate, key or federation bundle is missing, invalid, expired or revoked."""


class InsecureKeyFile(IdentityError):
    """A private key file (TLS/party key, CA key, HE secret context) is accessible to group or
    others; the message gives the ``chmod 600`` that fixes it."""


class ProtocolError(SecureFedError):
    """A peer sent a message that breaks the wire protocol.

    Args:
        message: what was wrong.
        close_code: the websocket close code the connection is closed with.
    """

    def __init__(self, message: str, close_code: int = 1008) -> None:
        super().__init__(message)
        self.close_code = close_code


class TransportError(SecureFedError):
    """A connection could not be made or was lost."""


class TLSRefused(TransportError):
    """The TLS handshake failed: the peers do not trust each other's certificates (another
    federation's bundle, a revoked or expired certificate), which retrying does not cure."""


class AuditError(SecureFedError):
    """The audit log is missing, broken or does not verify."""


class ExportError(SecureFedError):
    """A finished run's model cannot be exported as asked: its run directory is incomplete,
    its audit log does not verify, or the exported file does not compute what the model does."""
