"""Binary-weight (and optionally binary-activation) layers and :func:`binarize`, which swaps them in.

A binary-weight layer keeps a real-valued ("latent") weight ``W`` and convolves with
``W_b = alpha * sign(W)``, ``alpha`` the mean ``|W|`` of each output filter (the binary-weight
network scaling of Rastegari et al., "XNOR-Net", ECCV 2016, arXiv 1603.05279, which Xu et al.'s
binary-weight detector, arXiv 1804.06332, builds on). Gradients reach ``W`` by the straight-through
estimator: ``dL/dW = dL/dW_b`` (identity through ``sign`` and ``alpha``, as BinaryConnect). With
``activations=True`` the layer's *input* is binarised too, ``sign(x)`` with the hard-tanh
straight-through gradient ``1{|x| <= 1}`` (Hubara et al., "Binarized Neural Networks", 2016): the
BNN layer of the BENN paper (arXiv 1806.07550).

PyTorch's fake-quantisation modules (``torch.ao.quantization.FakeQuantize``) do not fit here: their
affine integer grid always contains 0, while a binary layer's two levels are ``{-alpha, +alpha}``;
the sign and its straight-through gradients are written with torch below.

The layers subclass ``nn.Conv2d`` / ``nn.Linear``, so a binarised model's state dict has the keys
and shapes of the full-precision one (a full-precision checkpoint loads into it, and back).
"""

from __future__ import annotations

import copy

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from distill.models.registry import register_model
from distill.models.small import CNN, cnn_digits_teacher

__all__ = ["BinaryConv2d", "BinaryLinear", "binarize", "binary_cnn", "cnn_digits_teacher_binary", "binary_layers", "binary_weight", "model_size_bits",
           "sign_ste"]


class _SignSTE(torch.autograd.Function):
    """``sign`` (with ``sign(0) = +1``) forward; ``grad * 1{|x| <= clip}`` backward (``clip=inf``: identity)."""

    @staticmethod
    def forward(ctx, x: Tensor, clip: float) -> Tensor:  # type: ignore[override]
        ctx.save_for_backward(x)
        ctx.clip = clip
        return torch.where(x >= 0, torch.ones_like(x), -torch.ones_like(x))

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:  # type: ignore[override]
        (x,) = ctx.saved_tensors
        if ctx.clip == float("inf"):
            return grad, None
        return grad * (x.abs() <= ctx.clip).to(grad.dtype), None


def sign_ste(x: Tensor, clip: float = 1.0) -> Tensor:
    """``sign(x)`` in ``{-1, +1}`` (0 maps to +1) with the straight-through gradient ``1{|x| <= clip}``
    (``clip=float('inf')``: the identity). Any shape."""
    return _SignSTE.apply(x, float(clip))


def binary_weight(w: Tensor) -> Tensor:
    """``alpha * sign(w)`` with ``alpha = mean |w|`` over each output filter (dim 0), XNOR-Net's
    binary-weight approximation; ``w``: ``(C_out, ...)``, returned with the same shape. The gradient
    passes straight through to ``w`` (identity)."""
    alpha = w.abs().mean(dim=tuple(range(1, w.dim())), keepdim=True) if w.dim() > 1 else w.abs().mean()
    wb = alpha * torch.where(w >= 0, torch.ones_like(w), -torch.ones_like(w))
    return w + (wb - w).detach()


class _BinaryLayer:
    """What the binary layers share: the ``activations`` switch (binary inputs) and their description."""

    activations: bool

    def _binary_init(self, activations: bool) -> None:
        self.activations = bool(activations)

    def _inputs(self, x: Tensor) -> Tensor:
        return sign_ste(x) if self.activations else x

    def extra_repr(self) -> str:
        return super().extra_repr() + f", binary weights{', binary inputs' if self.activations else ''}"  # type: ignore[misc]


class BinaryConv2d(_BinaryLayer, nn.Conv2d):
    """A ``Conv2d`` with binary weights ``alpha * sign(W)`` (and, with ``activations``, binary inputs)."""

    def __init__(self, *args, activations: bool = False, **kwargs) -> None:  # type: ignore[no-untyped-def]
        super().__init__(*args, **kwargs)
        self._binary_init(activations)

    def forward(self, x: Tensor) -> Tensor:
        return self._conv_forward(self._inputs(x), binary_weight(self.weight), self.bias)


class BinaryLinear(_BinaryLayer, nn.Linear):
    """A ``Linear`` with binary weights ``alpha * sign(W)`` (and, with ``activations``, binary inputs)."""

    def __init__(self, *args, activations: bool = False, **kwargs) -> None:  # type: ignore[no-untyped-def]
        super().__init__(*args, **kwargs)
        self._binary_init(activations)

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(self._inputs(x), binary_weight(self.weight), self.bias)


def _binary_copy(layer: nn.Module, activations: bool) -> nn.Module:
    if type(layer) is nn.Conv2d:
        new: nn.Module = BinaryConv2d(layer.in_channels, layer.out_channels, layer.kernel_size, layer.stride,
                                      layer.padding, layer.dilation, layer.groups, layer.bias is not None,
                                      layer.padding_mode, activations=activations)
    else:
        new = BinaryLinear(layer.in_features, layer.out_features, layer.bias is not None, activations=activations)
    new.load_state_dict(layer.state_dict())
    return new.to(device=layer.weight.device, dtype=layer.weight.dtype)


def binarize(model: nn.Module, *, activations: bool = False, keep_first: bool = True, keep_last: bool = True,
             inplace: bool = False) -> nn.Module:
    """Swap every ``nn.Conv2d`` / ``nn.Linear`` of ``model`` for :class:`BinaryConv2d` / :class:`BinaryLinear`
    (same weights, now the latent weights of the binary layer).

    Args:
        model: any module.
        activations: binarise the swapped layers' inputs too (a BNN rather than a binary-weight network);
            every ``nn.ReLU`` then becomes ``nn.Hardtanh`` (the BNN's activation, Hubara et al.), since
            the sign of a ReLU's output is always +1 and would carry nothing.
        keep_first, keep_last: leave the first / last such layer (in module order) full precision, as
            XNOR-Net and most BNN work do (the input image and the class scores keep their precision).
        inplace: swap in ``model`` itself; by default a deep copy is binarised and ``model`` is untouched.

    Returns:
        The binarised model. A ``ValueError`` when nothing is left to binarise.
    """
    target = model if inplace else copy.deepcopy(model)
    names = [n for n, m in target.named_modules() if type(m) in (nn.Conv2d, nn.Linear)]
    chosen = names[1 if keep_first else 0: len(names) - 1 if keep_last and names else len(names)]
    if not chosen:
        raise ValueError(f"binarize: no Conv2d/Linear layer left to binarise (found {len(names)}: {names}; "
                         f"keep_first={keep_first}, keep_last={keep_last})")
    for name in chosen:
        parent_name, _, attr = name.rpartition(".")
        parent = target.get_submodule(parent_name) if parent_name else target
        setattr(parent, attr, _binary_copy(getattr(parent, attr), activations))
    if activations:
        for name in [n for n, m in target.named_modules() if type(m) is nn.ReLU]:
            parent_name, _, attr = name.rpartition(".")
            setattr(target.get_submodule(parent_name) if parent_name else target, attr, nn.Hardtanh())
    return target


def binary_layers(model: nn.Module) -> list[str]:
    """The dotted names of the binary layers of ``model``."""
    return [n for n, m in model.named_modules() if isinstance(m, (BinaryConv2d, BinaryLinear))]


def model_size_bits(model: nn.Module) -> int:
    """Storage of ``model``'s parameters in bits: 1 bit per weight of a binary layer plus one 32-bit
    ``alpha`` per output filter; 32 bits for every other parameter (biases, BatchNorm, full-precision layers)."""
    bits = 0
    binary_weights = set()
    for m in model.modules():
        if isinstance(m, (BinaryConv2d, BinaryLinear)):
            bits += m.weight.numel() + 32 * m.weight.shape[0]
            binary_weights.add(id(m.weight))
    bits += sum(32 * p.numel() for p in model.parameters() if id(p) not in binary_weights)
    return bits


@register_model("binary_cnn")
def binary_cnn(num_classes: int = 10, in_channels: int = 1, widths: Sequence[int] = (32, 64, 128),
               activations: bool = False, **kwargs: Any) -> nn.Module:
    """The zoo's ``cnn`` (same arguments) binarised by :func:`binarize`: binary weights (and, with
    ``activations``, binary inputs) in every conv but the first, the classifier full precision."""
    return binarize(CNN(num_classes, in_channels, widths=widths, **kwargs), activations=activations, inplace=True)


@register_model("cnn_digits_teacher_binary")
def cnn_digits_teacher_binary(num_classes: int = 10, in_channels: int = 1, activations: bool = False) -> nn.Module:
    """``cnn_digits_teacher`` with binary weights (Xu et al.'s setting: the teacher's architecture, 1-bit
    weights; ~32x smaller weights in the binarised convs)."""
    return binarize(cnn_digits_teacher(num_classes, in_channels), activations=activations, inplace=True)
