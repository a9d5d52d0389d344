"""A small BiLSTM token tagger split into an encoder and a classifier, for adversarial imitation KD.

Liu, Chen, Liu (AAAI 2019) pair a teacher encoder that reads the gold annotations beside the words
with a student encoder that reads the words alone, and one event classifier ``C`` on either encoder's
per-token features. Here both encoders are :class:`TokenTagger`: word embeddings (plus, for the teacher,
an embedding of each token's gold annotation, added to the word's) → one BiLSTM layer → features
``(B, L, 2·hidden)`` → ``classifier`` (Linear) → tag logits ``(B, L, num_tags)``.
"""

from __future__ import annotations

from torch import Tensor, nn

__all__ = ["TokenTagger"]


class TokenTagger(nn.Module):
    """Words ``ids`` (B, L) long (0 = padding) and, when ``annotation_vocab > 0``, gold annotations
    ``annotations`` (B, L) long → tag logits (B, L, num_tags); :meth:`encode` gives the features
    (B, L, 2·hidden) the classifier reads."""

    def __init__(self, vocab_size: int, num_tags: int = 2, embed_dim: int = 32, hidden: int = 32,
                 annotation_vocab: int = 0) -> None:
        super().__init__()
        for name, v, low in (("vocab_size", vocab_size, 3), ("num_tags", num_tags, 2), ("embed_dim", embed_dim, 1),
                             ("hidden", hidden, 1), ("annotation_vocab", annotation_vocab, 0)):
            if isinstance(v, bool) or not isinstance(v, int) or v < low:
                raise ValueError(f"TokenTagger: {name} must be an int >= {low}; got {v!r}")
        self.embed = nn.Embedding(vocab_size, embed_dim, padding_idx=0)
        self.annotation = nn.Embedding(annotation_vocab, embed_dim) if annotation_vocab else None
        self.lstm = nn.LSTM(embed_dim, hidden, batch_first=True, bidirectional=True)
        self.features = nn.Identity()  # tap point: the per-token features the classifier reads
        self.classifier = nn.Linear(2 * hidden, num_tags)
        self.feature_dim = 2 * hidden

    def encode(self, ids: Tensor, annotations: Tensor | None = None) -> Tensor:
        if ids.dim() != 2:
            raise ValueError(f"TokenTagger: ids must be (B, L); got {tuple(ids.shape)}")
        x = self.embed(ids)
        if self.annotation is not None:
            if annotations is None or annotations.shape != ids.shape:
                raise ValueError("TokenTagger: this tagger reads gold annotations (B, L) beside the ids; got "
                                 f"{None if annotations is None else tuple(annotations.shape)}")
            x = x + self.annotation(annotations)
        return self.features(self.lstm(x)[0])

    def forward(self, ids: Tensor, annotations: Tensor | None = None) -> Tensor:
        return self.classifier(self.encode(ids, annotations))
