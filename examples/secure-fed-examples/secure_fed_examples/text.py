"""``text_lstm``: an LSTM text classifier over token ids, trainable with DP-SGD.

Embedding → Opacus's ``DPLSTM`` (an LSTM built from linear layers, so that Opacus has
per-sample gradients for it) → linear layer on the last step's hidden state. A record is
``seq_len`` token ids in ``0 … vocab_size − 1`` (pad with 0); the model declares
``input_dtype = torch.int64``, so secure_fed passes the features as integers.
"""

from __future__ import annotations

import torch
from opacus.layers import DPLSTM
from torch import nn

from secure_fed.errors import ModelError
from secure_fed.models.registry import MAX_CLASSES, MAX_PARAMETERS, MAX_WIDTH, check_int

#: Largest vocabulary accepted (token ids must stay exact in float32 features: < 2^24).
MAX_VOCABULARY = 1_000_000
#: Longest sequence accepted (tokens).
MAX_SEQUENCE = 4096
#: Largest embedding width.
MAX_EMBEDDING = 1024


class TextLSTM(nn.Module):
    """Embedding, DPLSTM, linear head on the last hidden state.

    Args:
        vocab_size: number of token ids.
        seq_len: tokens per record.
        embed_dim: embedding width.
        hidden: LSTM hidden width.
        num_classes: output width.
    """

    input_dtype = torch.int64

    def __init__(self, vocab_size: int, seq_len: int, embed_dim: int, hidden: int,
                 num_classes: int) -> None:
        super().__init__()
        self.seq_len = seq_len
        self.embedding = nn.Embedding(vocab_size, embed_dim)
        self.lstm = DPLSTM(embed_dim, hidden, batch_first=True)
        self.head = nn.Linear(hidden, num_classes)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        if tokens.dim() != 2 or tokens.shape[1] != self.seq_len:
            raise ValueError(f"text_lstm takes (batch, {self.seq_len}) token ids, got shape "
                             f"{tuple(tokens.shape)}")
        states, _ = self.lstm(self.embedding(tokens.long()))
        return self.head(states[:, -1])


def text_lstm(*, vocab_size: int, seq_len: int, num_classes: int, embed_dim: int = 32,
              hidden: int = 32) -> nn.Module:
    """An LSTM classifier of ``seq_len`` token ids.

    Args:
        vocab_size: token ids 0…vocab_size − 1 (2…1000000).
        seq_len: tokens per record, the schema's feature count (1…4096).
        num_classes: output width (2…10000).
        embed_dim: embedding width (1…1024).
        hidden: LSTM hidden width (1…4096).
    """
    vocab = check_int("vocab_size", vocab_size, 2, MAX_VOCABULARY)
    length = check_int("seq_len", seq_len, 1, MAX_SEQUENCE)
    n_out = check_int("num_classes", num_classes, 2, MAX_CLASSES)
    embed = check_int("embed_dim", embed_dim, 1, MAX_EMBEDDING)
    width = check_int("hidden", hidden, 1, MAX_WIDTH)
    count = vocab * embed + 4 * width * (embed + width + 2) + width * n_out + n_out
    if count > MAX_PARAMETERS:
        raise ModelError(f"text_lstm with vocab_size={vocab}, embed_dim={embed}, hidden={width} "
                         f"would have {count} parameters; the limit is {MAX_PARAMETERS}. Use a "
                         "smaller vocabulary or narrower layers")
    return TextLSTM(vocab, length, embed, width, n_out)
