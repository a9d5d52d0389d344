"""Frame-labelling and text models: frame-wise DNN teachers, highway and LSTM students, and the
word-embedding encoding layer of Mou et al.

Frame models read ``(B, T, F)`` feature frames and return per-frame logits ``(B, T, K)``:

* :class:`FrameDNN` -- a feedforward net on each frame spliced with ``context`` neighbours on
  each side (the hybrid speech DNN's input window), the teacher of Tang et al. (2016).
* :class:`FrameHDNN` -- the highway deep neural network of Lu et al. (2017): feedforward hidden
  layers joined by highway connections with a transform and a carry gate.
* :class:`HighwayLSTM` -- LSTM layers joined by the same highway connections (the brief's
  "highway-LSTM" student; the paper's HDNN gates applied between recurrent layers).
* :class:`FrameLSTM` -- a plain (uni- or bidirectional) LSTM with a per-frame classifier.

Text models read token ids ``(B, L)`` (``pad_id`` marks padding):

* :class:`EmbeddingEncoder` -- Mou et al.'s encoding layer ``e = f(W·E_teacher[id] + b)``.
* :class:`BagOfEmbeddings` -- mean of the (non-padding) token embeddings, then a linear classifier.

Tap points are named submodules (``"blocks.K"``, ``"lstm"``, ``"fc"``), read by
:mod:`distill.taps` like any other.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from distill.models.registry import register_model

__all__ = ["BagOfEmbeddings", "EmbeddingEncoder", "FrameDNN", "FrameHDNN", "FrameLSTM", "Highway", "HighwayLSTM",
           "splice_frames"]


def _positive(name: str, value: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int; got {value!r}")
    return value


def _frames(x: Tensor, in_features: int, who: str) -> None:
    if not isinstance(x, Tensor) or x.dim() != 3 or x.shape[-1] != in_features:
        shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
        raise ValueError(f"{who} expects frames (B, T, {in_features}); got {shape}")


def splice_frames(x: Tensor, context: int) -> Tensor:
    """Each frame with its ``context`` neighbours on each side, concatenated (zeros beyond the edges).

    ``x``: ``(B, T, F)`` -> ``(B, T, (2·context + 1)·F)``; the block order is ``t − context, ..., t + context``.
    """
    if isinstance(context, bool) or not isinstance(context, int) or context < 0:
        raise ValueError(f"context must be an int >= 0; got {context!r}")
    if context == 0:
        return x
    padded = nn.functional.pad(x, (0, 0, context, context))  # (B, T + 2c, F)
    t = x.shape[1]
    return torch.cat([padded[:, k:k + t] for k in range(2 * context + 1)], dim=-1)


class FrameDNN(nn.Module):
    """A frame-wise feedforward classifier on spliced frames: ``(B, T, F)`` -> logits ``(B, T, K)``.

    Args:
        in_features: features ``F`` per frame.
        num_classes: classes ``K`` per frame.
        hidden: widths of the ReLU hidden layers.
        context: frames spliced on each side of the centre frame (zeros beyond the sequence).
        dropout: dropout before each hidden layer's activation output.
    """

    def __init__(self, in_features: int, num_classes: int, hidden: Sequence[int] = (256, 256), context: int = 4,
                 dropout: float = 0.0) -> None:
        super().__init__()
        self.in_features = _positive("in_features", in_features)
        self.num_classes = _positive("num_classes", num_classes)
        splice_frames(torch.zeros(1, 1, 1), context)  # validates context
        self.context = context
        width = (2 * context + 1) * in_features
        layers: list[nn.Module] = []
        for i, h in enumerate(hidden):
            layers += [nn.Linear(width, _positive(f"hidden[{i}]", h)), nn.ReLU(), nn.Dropout(dropout)]
            width = h
        self.body = nn.Sequential(*layers)
        self.pool = nn.Identity()  # tap point: the last hidden layer (B, T, H)
        self.fc = nn.Linear(width, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        _frames(x, self.in_features, "FrameDNN")
        return self.fc(self.pool(self.body(splice_frames(x, self.context))))


class Highway(nn.Module):
    """The highway connection of Lu et al.'s HDNN around a layer ``g``:

    ``h_l = g(h_{l−1}) ∘ T(h_{l−1}) + h_{l−1} ∘ C(h_{l−1})``, with the transform gate
    ``T(h) = σ(W_T h + b_T)`` and the carry gate ``C(h) = σ(W_C h + b_C)``, both ``(…, D)``.
    ``carry=False`` drops the carry gate (``h_l = g(h) ∘ T(h) + h``), a variant Lu & Renals studied.
    ``gates`` may be another Highway's gates (tied across layers).
    """

    def __init__(self, width: int, carry: bool = True, gates: nn.ModuleDict | None = None) -> None:
        super().__init__()
        if gates is None:
            gates = nn.ModuleDict({"transform": nn.Linear(width, width)})
            if carry:
                gates["carry"] = nn.Linear(width, width)
        self.gates = gates

    def forward(self, h: Tensor, g_h: Tensor) -> Tensor:
        t = torch.sigmoid(self.gates["transform"](h))
        c = torch.sigmoid(self.gates["carry"](h)) if "carry" in self.gates else 1.0
        return g_h * t + h * c


class FrameHDNN(nn.Module):
    """The highway deep neural network (HDNN) student of Lu et al. (2017): ``(B, T, F)`` -> ``(B, T, K)``.

    An input layer to ``width`` units, ``depth`` hidden layers ``g_l(h) = σ(W_l h + b_l)`` (sigmoid,
    as in the HDNN papers) each wrapped in a :class:`Highway` connection, then the classifier.
    ``tied_gates`` shares one pair of gates across layers (Lu & Renals' parameter-saving variant).
    """

    def __init__(self, in_features: int, num_classes: int, width: int = 64, depth: int = 4, context: int = 0,
                 carry: bool = True, tied_gates: bool = False) -> None:
        super().__init__()
        self.in_features = _positive("in_features", in_features)
        self.num_classes = _positive("num_classes", num_classes)
        _positive("width", width)
        _positive("depth", depth)
        splice_frames(torch.zeros(1, 1, 1), context)
        self.context = context
        self.inp = nn.Sequential(nn.Linear((2 * context + 1) * in_features, width), nn.Sigmoid())
        self.layers = nn.ModuleList(nn.Linear(width, width) for _ in range(depth))
        first = Highway(width, carry)
        self.blocks = nn.ModuleList([first] + [Highway(width, carry, first.gates if tied_gates else None)
                                               for _ in range(depth - 1)])
        self.pool = nn.Identity()
        self.fc = nn.Linear(width, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        _frames(x, self.in_features, "FrameHDNN")
        h = self.inp(splice_frames(x, self.context))
        for layer, block in zip(self.layers, self.blocks):
            h = block(h, torch.sigmoid(layer(h)))
        return self.fc(self.pool(h))


class HighwayLSTM(nn.Module):
    """LSTM layers joined by :class:`Highway` connections: ``(B, T, F)`` -> ``(B, T, K)``.

    Layer 1 is an LSTM from ``F`` to ``hidden``; each later layer ``l`` is
    ``h_l = LSTM_l(h_{l−1}) ∘ T(h_{l−1}) + h_{l−1} ∘ C(h_{l−1})`` (gates per frame). This applies Lu et
    al.'s HDNN highway connection between recurrent layers; the paper's own student is the
    feedforward :class:`FrameHDNN`.
    """

    def __init__(self, in_features: int, num_classes: int, hidden: int = 32, layers: int = 2,
                 carry: bool = True, tied_gates: bool = False, bidirectional: bool = False) -> None:
        super().__init__()
        self.in_features = _positive("in_features", in_features)
        self.num_classes = _positive("num_classes", num_classes)
        _positive("hidden", hidden)
        if _positive("layers", layers) < 2:
            raise ValueError(f"HighwayLSTM needs layers >= 2 (highway connections join layers); got {layers}")
        width = hidden * (2 if bidirectional else 1)  # each layer's output (B, T, width)
        self.lstms = nn.ModuleList(
            [nn.LSTM(in_features, hidden, batch_first=True, bidirectional=bidirectional)]
            + [nn.LSTM(width, hidden, batch_first=True, bidirectional=bidirectional) for _ in range(layers - 1)])
        first = Highway(width, carry)
        self.blocks = nn.ModuleList([first] + [Highway(width, carry, first.gates if tied_gates else None)
                                               for _ in range(layers - 2)])
        self.pool = nn.Identity()
        self.fc = nn.Linear(width, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        _frames(x, self.in_features, "HighwayLSTM")
        h, _ = self.lstms[0](x)
        for lstm, block in zip(self.lstms[1:], self.blocks):
            h = block(h, lstm(h)[0])
        return self.fc(self.pool(h))


class FrameLSTM(nn.Module):
    """A plain LSTM with a per-frame linear classifier: ``(B, T, F)`` -> ``(B, T, K)``."""

    def __init__(self, in_features: int, num_classes: int, hidden: int = 32, layers: int = 1,
                 bidirectional: bool = False) -> None:
        super().__init__()
        self.in_features = _positive("in_features", in_features)
        self.num_classes = _positive("num_classes", num_classes)
        self.lstm = nn.LSTM(in_features, _positive("hidden", hidden), num_layers=_positive("layers", layers),
                            batch_first=True, bidirectional=bidirectional)
        self.pool = nn.Identity()
        self.fc = nn.Linear(hidden * (2 if bidirectional else 1), num_classes)

    def forward(self, x: Tensor) -> Tensor:
        _frames(x, self.in_features, "FrameLSTM")
        return self.fc(self.pool(self.lstm(x)[0]))


class EmbeddingEncoder(nn.Module):
    """Mou et al.'s encoding layer: a frozen teacher table ``E`` ``(V, D)`` encoded to ``d`` dimensions.

    ``forward(ids)``: ``(B, L)`` -> ``f(E[ids] W^T + b)`` ``(B, L, d)`` with ``f`` = ``activation``
    (``"relu"``, ``"tanh"``, ``"sigmoid"`` or ``"none"``). Only ``W`` ``(d, D)`` and ``b`` train.
    After training, :meth:`export` precomputes every row, ``f(E W^T + b)`` ``(V, d)``, as a plain
    ``nn.Embedding``: the large table and the encoder are then discarded (the paper's deployment).

    Paper: L. Mou, R. Jia, Y. Xu, G. Li, L. Zhang, Z. Jin, "Distilling Word Embeddings: An Encoding
    Approach", CIKM 2016, arXiv 1506.04488.
    """

    ACTIVATIONS = {"relu": torch.relu, "tanh": torch.tanh, "sigmoid": torch.sigmoid, "none": lambda z: z}

    def __init__(self, teacher_table: Tensor, dim: int, activation: str = "tanh") -> None:
        super().__init__()
        if not isinstance(teacher_table, Tensor) or teacher_table.dim() != 2 or not teacher_table.is_floating_point():
            shape = tuple(teacher_table.shape) if isinstance(teacher_table, Tensor) else type(teacher_table).__name__
            raise ValueError(f"teacher_table must be a floating-point tensor (V, D); got {shape}")
        if activation not in self.ACTIVATIONS:
            raise ValueError(f"activation must be one of {sorted(self.ACTIVATIONS)}; got {activation!r}")
        self.register_buffer("teacher_table", teacher_table.detach().clone())
        self.encode = nn.Linear(teacher_table.shape[1], _positive("dim", dim))
        self.activation = activation
        self.embedding_dim = dim
        self.num_embeddings = teacher_table.shape[0]

    def encode_rows(self, rows: Tensor) -> Tensor:
        """``f(rows W^T + b)``: ``(..., D)`` -> ``(..., d)``."""
        return self.ACTIVATIONS[self.activation](self.encode(rows))

    def forward(self, ids: Tensor) -> Tensor:
        return self.encode_rows(self.teacher_table[ids])

    @torch.no_grad()
    def export(self) -> nn.Embedding:
        """The distilled table ``f(E W^T + b)`` ``(V, d)`` as an ``nn.Embedding`` (trainable, a copy)."""
        return nn.Embedding.from_pretrained(self.encode_rows(self.teacher_table).clone(), freeze=False)


class BagOfEmbeddings(nn.Module):
    """Mean of the non-padding token embeddings, then a linear classifier: ``(B, L)`` -> ``(B, K)``.

    ``embedding``: any module mapping ids ``(B, L)`` to ``(B, L, d)`` (an ``nn.Embedding`` or an
    :class:`EmbeddingEncoder`); built as ``nn.Embedding(vocab_size, dim)`` when None.
    """

    def __init__(self, num_classes: int, vocab_size: int | None = None, dim: int = 32,
                 embedding: nn.Module | None = None, pad_id: int = 0, hidden: int = 0) -> None:
        super().__init__()
        _positive("num_classes", num_classes)
        if embedding is None:
            if vocab_size is None:
                raise ValueError("BagOfEmbeddings needs vocab_size (to build its embedding) or an embedding module")
            embedding = nn.Embedding(_positive("vocab_size", vocab_size), _positive("dim", dim))
        self.embedding = embedding
        self.pad_id = pad_id
        width = getattr(embedding, "embedding_dim", dim)
        self.mlp = nn.Sequential(nn.Linear(width, hidden), nn.ReLU()) if hidden else nn.Identity()
        self.pool = nn.Identity()
        self.fc = nn.Linear(hidden or width, num_classes)

    def forward(self, ids: Tensor) -> Tensor:
        if not isinstance(ids, Tensor) or ids.dim() != 2 or ids.is_floating_point():
            raise ValueError(f"BagOfEmbeddings expects integer token ids (B, L); got "
                             f"{tuple(ids.shape) if isinstance(ids, Tensor) else type(ids).__name__}")
        keep = (ids != self.pad_id).unsqueeze(-1).float()  # (B, L, 1)
        e = self.embedding(ids)  # (B, L, d)
        mean = (e * keep).sum(1) / keep.sum(1).clamp_min(1.0)
        return self.fc(self.pool(self.mlp(mean)))


register_model("frame_dnn")(FrameDNN)
register_model("frame_hdnn")(FrameHDNN)
register_model("frame_highway_lstm")(HighwayLSTM)
register_model("frame_lstm")(FrameLSTM)
register_model("bag_of_embeddings")(BagOfEmbeddings)
