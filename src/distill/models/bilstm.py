"""The BiLSTM text classifier of Tang et al. 2019, and its siamese form for sentence pairs.

Tang, Lu, Liu, Mou, Vechtomova, Lin, "Distilling Task-Specific Knowledge from BERT into Simple
Neural Networks", 2019, arXiv 1903.12136 (§3.2, the student models).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn.utils.rnn import pack_padded_sequence

from distill.models.registry import register_model

__all__ = ["BiLSTMClassifier"]


class BiLSTMClassifier(nn.Module):
    """Single-layer BiLSTM → [last forward state; last backward state] → ReLU FC → class logits.

    Single sentences (``siamese=False``): ``h = [h_fwd; h_bwd]`` (B, 2·hidden), logits =
    ``W_2 ReLU(W_1 h + b_1) + b_2`` (the softmax is the loss's). Sentence pairs (``siamese=True``):
    the same encoder (shared weights) reads both sentences, and the classifier sees
    ``[h_1; h_2; h_1 ⊙ h_2; |h_1 − h_2|]`` (B, 8·hidden), as in the paper's siamese student.

    Forward: ``input_ids`` (B, L) long, ``attention_mask`` (B, L) (1 = token, 0 = padding; each
    row's length is its count of ones, padding must be at the end; ``None``: no padding), and for
    pairs ``pair_ids`` / ``pair_mask`` (B, L2) → logits ``(B, num_classes)``. It takes keyword
    arguments like a Hugging Face model, so a :class:`~distill.batch.TokenBatch` feeds it directly;
    other keywords (``token_type_ids``) are ignored.

    Defaults: 300-d embeddings (the paper initialises them from word2vec and fine-tunes them; here
    they start random unless ``embeddings`` is given), 150 hidden units per direction, a 200-unit
    ReLU layer (400 for pairs in the paper: pass ``fc_dim``), as recalled from the paper (§3.2, §4.2;
    its full text was not readable offline).
    """

    def __init__(self, vocab_size: int, num_classes: int, embed_dim: int = 300, hidden_dim: int = 150,
                 fc_dim: int = 200, siamese: bool = False, padding_idx: int = 0, dropout: float = 0.0,
                 embeddings: Tensor | None = None) -> None:
        super().__init__()
        for name, v in (("vocab_size", vocab_size), ("num_classes", num_classes), ("embed_dim", embed_dim),
                        ("hidden_dim", hidden_dim), ("fc_dim", fc_dim)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"BiLSTMClassifier {name} must be an int >= 1, got {v!r}")
        if not 0 <= padding_idx < vocab_size:
            raise ValueError(f"padding_idx must be in [0, {vocab_size}), got {padding_idx}")
        self.embed = nn.Embedding(vocab_size, embed_dim, padding_idx=padding_idx)
        if embeddings is not None:
            if tuple(embeddings.shape) != (vocab_size, embed_dim):
                raise ValueError(f"embeddings must be (vocab_size, embed_dim) = {(vocab_size, embed_dim)}, got "
                                 f"{tuple(embeddings.shape)}")
            with torch.no_grad():
                self.embed.weight.copy_(embeddings)
        self.lstm = nn.LSTM(embed_dim, hidden_dim, num_layers=1, batch_first=True, bidirectional=True)
        self.siamese = bool(siamese)
        width = 2 * hidden_dim * (4 if self.siamese else 1)
        self.features = nn.Identity()  # tap point: the sentence (pair) feature entering the classifier
        self.fc = nn.Sequential(nn.Dropout(dropout), nn.Linear(width, fc_dim), nn.ReLU(), nn.Dropout(dropout),
                                nn.Linear(fc_dim, num_classes))

    def encode(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        """``input_ids`` (B, L) → ``[h_fwd; h_bwd]`` (B, 2·hidden): the final states of both directions
        over each row's real tokens."""
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be (B, L), got {tuple(input_ids.shape)}")
        if attention_mask is None:
            lengths = torch.full((input_ids.shape[0],), input_ids.shape[1], dtype=torch.long)
        else:
            if attention_mask.shape != input_ids.shape:
                raise ValueError(f"attention_mask {tuple(attention_mask.shape)} must match input_ids "
                                 f"{tuple(input_ids.shape)}")
            lengths = (attention_mask > 0).sum(1).clamp_min(1).cpu()
        packed = pack_padded_sequence(self.embed(input_ids), lengths, batch_first=True, enforce_sorted=False)
        _, (h_n, _) = self.lstm(packed)  # h_n: (2, B, hidden), forward then backward
        return torch.cat([h_n[0], h_n[1]], dim=-1)

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None, pair_ids: Tensor | None = None,
                pair_mask: Tensor | None = None, **_: Tensor) -> Tensor:
        h = self.encode(input_ids, attention_mask)
        if self.siamese:
            if pair_ids is None:
                raise ValueError("a siamese BiLSTMClassifier needs pair_ids (B, L2): the second sentence")
            h2 = self.encode(pair_ids, pair_mask)
            h = torch.cat([h, h2, h * h2, (h - h2).abs()], dim=-1)
        elif pair_ids is not None:
            raise ValueError("pair_ids given to a single-sentence BiLSTMClassifier; build it with siamese=True")
        return self.fc(self.features(h))


@register_model("bilstm_tang")
def bilstm_tang(vocab_size: int, num_classes: int, embed_dim: int = 300, hidden_dim: int = 150, fc_dim: int = 200,
                siamese: bool = False, padding_idx: int = 0, dropout: float = 0.0) -> BiLSTMClassifier:
    """Tang et al. 2019's single-layer BiLSTM student (arXiv 1903.12136); ``siamese=True`` for pairs."""
    return BiLSTMClassifier(vocab_size, num_classes, embed_dim, hidden_dim, fc_dim, siamese, padding_idx, dropout)
