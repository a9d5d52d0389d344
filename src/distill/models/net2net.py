"""Function-preserving growth of a network: Net2WiderNet and Net2DeeperNet, plus a width change with
fresh weights (:func:`resize`) for building a narrower or wider twin of a model.

Paper: T. Chen, I. Goodfellow, J. Shlens, "Net2Net: Accelerating Learning via Knowledge Transfer",
ICLR 2016, arXiv 1511.05641.

* **Net2WiderNet** (:func:`widen`) grows layer ``i`` from ``n`` to ``q > n`` units with the random
  mapping :math:`g(j) = j` for :math:`j < n`, :math:`g(j) \\sim \\mathcal U\\{0..n-1\\}` for
  :math:`j \\ge n`. The new incoming weights copy the old unit's, :math:`U^{(i)}_{\\cdot, j} =
  W^{(i)}_{\\cdot, g(j)}` (with its bias), and the next layer's outgoing weights are divided by the
  number of replicas, :math:`U^{(i+1)}_{j, \\cdot} = W^{(i+1)}_{g(j), \\cdot} / |\\{x: g(x) = g(j)\\}|`,
  so the wider network computes the same function. A BatchNorm between the two layers has its scale,
  shift and running statistics copied with the units (the paper: "copy the normalization scale and bias
  of the replicated units"). Convolutions replicate output channels; a linear layer that reads a
  flattened ``(B, C, h, w)`` map replicates blocks of ``h·w`` inputs.
* **Net2DeeperNet** (:func:`deepen`) inserts an identity layer after a ReLU: a linear layer with
  :math:`U = I`, or a convolution whose kernel is 1 at its centre tap of channel ``c → c`` and 0 elsewhere,
  followed by a ReLU (idempotent on the non-negative input). With BatchNorm the new normalisation layer
  gets its scale and shift set to *undo* the normalisation of the layer's statistics (estimated by a
  forward pass over training data, the ``example`` batch): running mean :math:`\\mu`, running variance
  :math:`\\sigma^2`, scale :math:`\\sqrt{\\sigma^2 + \\epsilon}`, shift :math:`\\mu`, which is the identity
  in evaluation mode (in training mode BatchNorm uses the batch's own statistics, so the identity holds
  only approximately).
* **Noise** (``widen(..., noise=s)``): the paper mentions adding a little noise to break the symmetry of
  the replicas (which then no longer compute exactly the same function). Only the paper's abstract and
  introduction could be read here; the form of the noise is ours: Gaussian noise of standard deviation
  ``s · std(W^{(i)})`` added to the incoming weights of the *new* replicas (``j >= n``) only.

Which layers a widening touches: ``layer`` (an ``nn.Conv2d`` or ``nn.Linear`` named by its dotted path),
the ``BatchNorm1d``/``BatchNorm2d`` layers that follow it before the next weight layer, and that next
weight layer (the ``consumer``), found in registration order (``model.named_modules()``), which is the
execution order of the zoo's sequential models (``mlp``, ``cnn``, ``lenet5``...). Residual models whose
registration order is not the data flow must name ``consumer=`` (and widening a layer whose output
is added to a skip path is not function-preserving: it is refused only where this module can see it).
Everything here edits the model in place (modules are replaced by new ones of the new shape, on the
same device and dtype) and returns it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

__all__ = ["Chain", "deepen", "locate", "replication_map", "resize", "widen", "width_of"]

_WEIGHTED = (nn.Conv2d, nn.Linear)
_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d)


@dataclass
class Chain:
    """A weight layer, the BatchNorm layers on its output and the next weight layer that reads it."""

    name: str
    layer: nn.Module
    norms: list[tuple[str, nn.Module]]
    consumer_name: str
    consumer: nn.Module


def width_of(layer: nn.Module) -> int:
    """Output units of an ``nn.Conv2d`` (channels) or ``nn.Linear`` (features)."""
    if isinstance(layer, nn.Conv2d):
        return layer.out_channels
    if isinstance(layer, nn.Linear):
        return layer.out_features
    raise TypeError(f"expected an nn.Conv2d or nn.Linear, got {type(layer).__name__}")


def _get(model: nn.Module, name: str, what: str) -> nn.Module:
    try:
        return model.get_submodule(name)
    except AttributeError:
        weighted = [n for n, m in model.named_modules() if isinstance(m, _WEIGHTED)]
        raise ValueError(f"{what} {name!r} is not a submodule of {type(model).__name__}; its weight layers are "
                         f"{weighted}") from None


def locate(model: nn.Module, layer: str, consumer: str | None = None) -> Chain:
    """The :class:`Chain` of ``layer``: its BatchNorms and its consumer (the next ``nn.Conv2d``/``nn.Linear``
    in registration order, or the one named by ``consumer``).

    Raises:
        ValueError: ``layer`` is not a weight layer of ``model``, a grouped convolution, or has no consumer;
            the consumer's input size does not match ``layer``'s width.
    """
    mod = _get(model, layer, "layer")
    if not isinstance(mod, _WEIGHTED):
        raise ValueError(f"layer {layer!r} is a {type(mod).__name__}; Net2Net widens an nn.Conv2d or nn.Linear")
    width = width_of(mod)
    norms: list[tuple[str, nn.Module]] = []
    found: tuple[str, nn.Module] | None = None
    seen = False
    for name, m in model.named_modules():
        if name == layer:
            seen = True
            continue
        if not seen or (m is mod):
            continue
        if consumer is None and isinstance(m, _NORMS) and m.num_features == width and found is None:
            norms.append((name, m))
        elif consumer is None and isinstance(m, _WEIGHTED):
            found = (name, m)
            break
    if consumer is not None:
        found = (consumer, _get(model, consumer, "consumer"))
        norms = [(n, m) for n, m in model.named_modules() if isinstance(m, _NORMS) and _between(model, layer, n, consumer)
                 and m.num_features == width]
    if found is None:
        raise ValueError(f"layer {layer!r} is followed by no nn.Conv2d/nn.Linear in {type(model).__name__}: the "
                         "last layer (the classifier) cannot be widened, its outputs are the logits")
    cname, cons = found
    for m in (mod, cons):
        if isinstance(m, nn.Conv2d) and m.groups != 1:
            raise ValueError(f"grouped convolutions (groups={m.groups}) are not supported by Net2WiderNet here")
    fan_in = cons.in_channels if isinstance(cons, nn.Conv2d) else cons.in_features
    if fan_in % width != 0 or (isinstance(cons, nn.Conv2d) and fan_in != width):
        raise ValueError(f"consumer {cname!r} reads {fan_in} inputs, which do not come from {layer!r}'s {width} "
                         "units; name the layer that reads it with consumer=")
    return Chain(layer, mod, norms, cname, cons)


def _between(model: nn.Module, first: str, name: str, last: str) -> bool:
    order = [n for n, _ in model.named_modules()]
    return order.index(first) < order.index(name) < order.index(last)


def replication_map(old: int, new: int, generator: torch.Generator | None = None) -> Tensor:
    """Net2WiderNet's mapping ``g``: ``(new,)`` long tensor, ``g[j] = j`` for ``j < old``, a uniform draw from
    ``[0, old)`` for the rest."""
    if isinstance(old, bool) or isinstance(new, bool) or not isinstance(old, int) or not isinstance(new, int):
        raise TypeError(f"widths must be ints; got old={old!r}, new={new!r}")
    if old < 1 or new < old:
        raise ValueError(f"Net2WiderNet grows a layer: new width {new} must be >= the current width {old} >= 1")
    extra = torch.randint(old, (new - old,), generator=generator)
    return torch.cat([torch.arange(old), extra])


def _like_conv(conv: nn.Conv2d, cin: int, cout: int) -> nn.Conv2d:
    w = conv.weight
    return nn.Conv2d(cin, cout, conv.kernel_size, conv.stride, conv.padding, conv.dilation, 1, conv.bias is not None,
                     conv.padding_mode, device=w.device, dtype=w.dtype)


def _like(layer: nn.Module, fan_in: int, fan_out: int) -> nn.Module:
    if isinstance(layer, nn.Conv2d):
        return _like_conv(layer, fan_in, fan_out)
    w = layer.weight
    return nn.Linear(fan_in, fan_out, layer.bias is not None, device=w.device, dtype=w.dtype)


def _like_norm(bn: nn.Module, n: int) -> nn.Module:
    ref = bn.weight if bn.weight is not None else bn.running_mean
    return type(bn)(n, bn.eps, bn.momentum, bn.affine, bn.track_running_stats, device=ref.device, dtype=ref.dtype)


def _swap(model: nn.Module, name: str, old: nn.Module, new: nn.Module) -> None:
    """Put ``new`` where ``old`` was, in ``old``'s training mode (a BatchNorm made in training mode inside an
    evaluating model would normalise by the batch)."""
    new.train(old.training)
    model.set_submodule(name, new)


def _fan_in(layer: nn.Module) -> int:
    return layer.in_channels if isinstance(layer, nn.Conv2d) else layer.in_features


@torch.no_grad()
def widen(model: nn.Module, layer: str, new_width: int, *, noise: float = 0.0,
          generator: torch.Generator | None = None, consumer: str | None = None) -> nn.Module:
    """Net2WiderNet: grow ``layer`` to ``new_width`` units, preserving the function (exactly, up to
    floating-point rounding, when ``noise == 0``).

    Args:
        model: edited in place and returned.
        layer: dotted path of an ``nn.Conv2d`` ``(B, C, H, W) -> (B, n, H', W')`` or ``nn.Linear``
            ``(B, D) -> (B, n)``; not the classifier.
        new_width: ``q >= n`` output units.
        noise: relative standard deviation of the symmetry-breaking noise on the new replicas' incoming
            weights (ours; 0: exact).
        generator: draws ``g`` and the noise (reproducible growth).
        consumer: the layer reading ``layer``'s output, when registration order does not give it.
    """
    if not isinstance(noise, (int, float)) or isinstance(noise, bool) or noise < 0:
        raise ValueError(f"noise must be a number >= 0; got {noise!r}")
    chain = locate(model, layer, consumer)
    old = width_of(chain.layer)
    g = replication_map(old, new_width, generator)
    if new_width == old:
        return model
    counts = torch.bincount(g, minlength=old).to(chain.layer.weight.dtype)
    # incoming weights: copy unit g(j) into unit j
    src = chain.layer
    new = _like(src, _fan_in(src), new_width)
    dev_g = g.to(src.weight.device)
    new.weight.copy_(src.weight[dev_g])
    if src.bias is not None:
        new.bias.copy_(src.bias[dev_g])
    if noise > 0 and new_width > old:
        std = float(src.weight.std()) * noise
        shape = new.weight[old:].shape
        eps = torch.randn(shape, generator=generator).to(new.weight) * std
        new.weight[old:] += eps
    _swap(model, chain.name, src, new)
    # BatchNorms between: each unit's statistics and affine parameters follow it
    for name, bn in chain.norms:
        nb = _like_norm(bn, new_width)
        for attr in ("weight", "bias", "running_mean", "running_var"):
            t = getattr(bn, attr)
            if t is not None:
                getattr(nb, attr).copy_(t[g.to(t.device)])
        if bn.num_batches_tracked is not None:
            nb.num_batches_tracked.copy_(bn.num_batches_tracked)
        _swap(model, name, bn, nb)
    # outgoing weights: unit j receives W[:, g(j)] / count(g(j)); a flattened map has blocks of k inputs
    cons = chain.consumer
    k = _fan_in(cons) // old
    nc = _like(cons, new_width * k, width_of(cons))
    w = cons.weight
    if isinstance(cons, nn.Conv2d):
        scaled = (w / counts.to(w.device).view(1, -1, 1, 1))[:, dev_g]
    else:
        blocks = w.view(w.shape[0], old, k) / counts.to(w.device).view(1, -1, 1)
        scaled = blocks[:, dev_g].reshape(w.shape[0], new_width * k)
    nc.weight.copy_(scaled)
    if cons.bias is not None:
        nc.bias.copy_(cons.bias)
    _swap(model, chain.consumer_name, cons, nc)
    if chain.consumer_name == "fc" and getattr(model, "feature_dim", None) == old:
        model.feature_dim = new_width
    return model


@torch.no_grad()
def resize(model: nn.Module, layer: str, new_width: int, *, consumer: str | None = None) -> nn.Module:
    """Give ``layer`` ``new_width`` output units (fewer or more) with *freshly initialised* weights in
    ``layer``, its BatchNorms and its consumer (the rest of the model is untouched). Not function-preserving:
    for building a model of another width from a template (e.g. the student of "prune, then distill")."""
    if isinstance(new_width, bool) or not isinstance(new_width, int) or new_width < 1:
        raise ValueError(f"new_width must be a positive int; got {new_width!r}")
    chain = locate(model, layer, consumer)
    old = width_of(chain.layer)
    k = _fan_in(chain.consumer) // old
    _swap(model, chain.name, chain.layer, _like(chain.layer, _fan_in(chain.layer), new_width))
    for name, bn in chain.norms:
        _swap(model, name, bn, _like_norm(bn, new_width))
    _swap(model, chain.consumer_name, chain.consumer,
          _like(chain.consumer, new_width * k, width_of(chain.consumer)))
    if chain.consumer_name == "fc" and getattr(model, "feature_dim", None) == old:
        model.feature_dim = new_width
    return model


@torch.no_grad()
def deepen(model: nn.Module, after: str, example: Tensor, *, batch_norm: bool | None = None,
           kernel_size: int = 3) -> nn.Module:
    """Net2DeeperNet: insert an identity layer (+ BatchNorm) + ReLU after the submodule ``after``.

    ``after``'s output must be non-negative (it must end in a ReLU; checked on ``example``), so that the
    new ReLU leaves it unchanged. The submodule is replaced by ``nn.Sequential(after, new block)``: naming a
    parameter-free activation (``"stage1.act"``, ``"hidden1.act"``) keeps every existing parameter's name.

    Args:
        model: edited in place and returned (in evaluation mode it computes the same function).
        after: dotted path of the submodule whose output ``(B, C, H, W)`` (a conv block: a
            ``kernel_size`` x ``kernel_size`` identity convolution, padding ``kernel_size // 2``) or
            ``(B, D)`` (an identity ``nn.Linear``) the new layer reads.
        example: a batch of training inputs ``(B, ...)``: the output's shape, the ReLU check and, with
            BatchNorm, the statistics the new normalisation layer undoes.
        batch_norm: add a BatchNorm after the new layer; default: when ``model`` has any BatchNorm.
        kernel_size: odd kernel size of a new convolution.
    """
    if isinstance(kernel_size, bool) or not isinstance(kernel_size, int) or kernel_size < 1 or kernel_size % 2 == 0:
        raise ValueError(f"kernel_size must be an odd positive int (an identity kernel has a centre); got {kernel_size!r}")
    target = _get(model, after, "after")
    if batch_norm is None:
        batch_norm = any(isinstance(m, _NORMS) for m in model.modules())
    captured: list[Tensor] = []
    handle = target.register_forward_hook(lambda _m, _i, out: captured.append(out))
    was_training = model.training
    model.eval()
    try:
        model(example)
    finally:
        handle.remove()
        model.train(was_training)
    if not captured or not isinstance(captured[0], Tensor):
        raise ValueError(f"submodule {after!r} did not run on the example batch (or returned no tensor)")
    h = captured[0]
    if h.dim() not in (2, 4):
        raise ValueError(f"Net2DeeperNet inserts after an output (B, D) or (B, C, H, W); {after!r} gives {tuple(h.shape)}")
    if float(h.min()) < 0:
        raise ValueError(f"{after!r}'s output has negative values (min {float(h.min()):.3g}): Net2DeeperNet's identity "
                         "layer needs a ReLU before it (name the block whose output is post-ReLU)")
    c = h.shape[1]
    p = next(iter(model.parameters()), torch.empty(0))
    kw = {"device": h.device, "dtype": p.dtype if p.numel() else h.dtype}
    if h.dim() == 4:
        layer = nn.Conv2d(c, c, kernel_size, padding=kernel_size // 2, bias=not batch_norm, **kw)
        layer.weight.zero_()
        layer.weight[torch.arange(c), torch.arange(c), kernel_size // 2, kernel_size // 2] = 1.0
        dims = (0, 2, 3)
        norm: nn.Module | None = nn.BatchNorm2d(c, **kw) if batch_norm else None
    else:
        layer = nn.Linear(c, c, bias=not batch_norm, **kw)
        layer.weight.copy_(torch.eye(c, **kw))
        dims = (0,)
        norm = nn.BatchNorm1d(c, **kw) if batch_norm else None
    if layer.bias is not None:
        layer.bias.zero_()
    parts: list[nn.Module] = [layer]
    if norm is not None:
        if h.numel() // c < 2:
            raise ValueError("the example batch needs at least 2 values per channel to estimate the statistics "
                             "the new BatchNorm undoes")
        mean = h.mean(dims)
        var = h.var(dims, unbiased=True)
        norm.running_mean.copy_(mean)
        norm.running_var.copy_(var)
        norm.weight.copy_(torch.sqrt(var + norm.eps))
        norm.bias.copy_(mean)
        parts.append(norm)
    parts.append(nn.ReLU())
    block = nn.Sequential(target, *parts)
    block.train(was_training)
    model.set_submodule(after, block)
    return model
