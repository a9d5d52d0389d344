"""Infinite-width kernels of ReLU networks and kernel ridge regression: the math of KIP.

* :func:`relu_kernels` — the arc-cosine expectations of a ReLU layer (Cho & Saul 2009):
  for pre-activations ``(u, v) ~ N(0, [[k11, k12], [k12, k22]])``, with
  ``θ = arccos(k12 / sqrt(k11 k22))``,

      Σ(k)  = E[relu(u) relu(v)] = (sqrt(k11 k22 - k12²) + (π - θ) k12) / (2π)
      Σ̇(k) = E[1{u>0} 1{v>0}]   = (π - θ) / (2π)

* :func:`fc_ntk` — the NTK (and NNGP) of a fully-connected ReLU network in the NTK
  parameterisation (Jacot, Gabriel & Hongler, "Neural Tangent Kernel", NeurIPS 2018, arXiv
  1806.07572; the recursion as written by Arora et al., "On Exact Computation with an Infinitely
  Wide Neural Net", NeurIPS 2019, arXiv 1904.11955): with ``σ_w²`` the weight and ``σ_b²`` the bias
  variance, ``d`` the input dimension and ``depth`` hidden layers,

      K¹(x, x') = σ_w² x·x'/d + σ_b²,                 Θ¹ = K¹
      K^{l+1}   = σ_w² Σ(K^l) + σ_b²,                 Θ^{l+1} = K^{l+1} + σ_w² Σ̇(K^l) Θ^l

  and the network's NTK is ``Θ^{depth+1}`` (its NNGP ``K^{depth+1}``).

* :func:`conv_ntk` — the convolutional NTK (CNTK, Arora et al. 2019, arXiv 1904.11955) of
  ``depth`` x [conv 3x3 (zero "same" padding) -> ReLU -> average pool 2x2/2] -> flatten -> dense,
  computed exactly on the full ``(HW x HW)`` pixel-covariance tensor of every pair of images:
  a 3x3 convolution maps a covariance ``M`` to ``A(M)[i, j] = σ_w²/9 Σ_a M[i+a, j+a] + σ_b²``
  (the same offset ``a`` on both sides; zero outside the image), the pooling averages ``M`` over
  2x2 blocks on both sides, and the flatten + dense readout gives ``σ_w² mean_i M[i, i] + σ_b²``
  (``readout="gap"``, global average pooling: ``σ_w² mean_{i,j} M[i, j] + σ_b²``). The recursion
  is that of the FC kernel with ``A`` in place of the dense layer:
  ``K^{l+1} = A(P(Σ(K^l)))``, ``Θ^{l+1} = K^{l+1} + A₀(P(Σ̇(K^l) ⊙ Θ^l))`` (``A₀``: ``A`` without
  its bias, ``P`` the pooling). **Cost**: ``O(N₁ N₂ (HW)² · 9)`` time and ``O(N₁ N₂ (HW)²)`` memory
  for the first layer (each pooling divides ``(HW)²`` by 16): a 28x28 pair holds 614,656 entries
  (4.9 MB in float64), an 8x8 pair 4,096.

* :func:`krr_predict` / :func:`krr_loss` — kernel ridge regression from a support set and the KIP
  loss (Nguyen, Chen & Lee, "Dataset Meta-Learning from Kernel Ridge-Regression", ICLR 2021,
  arXiv 2011.00050, Eq. 2 and Algorithm 1): ``ŷ_t = K_ts (K_ss + λ I)⁻¹ y_s`` and
  ``L = ½ ‖y_t - ŷ_t‖²`` with ``λ = reg · tr(K_ss) / n_s`` (the scaling of the authors' code).

Numerics: ``θ`` is computed as ``atan2(sqrt(k11 k22 - k12²), k12)``, and where
``k11 k22 - k12² < eps · k11 k22`` (``eps`` = 1e-10 in float64, 1e-6 in float32) the square root is
taken as 0 with no gradient. Identical or nearly identical inputs sit on the cusp of Σ̇ (its
derivative is infinite there): they get a zero gradient through ``θ`` instead of one blown up by
rounding, exact values on the diagonal, and values off by at most ``sqrt(eps)/(2π)`` (1.6e-6 in
float64) elsewhere. An input of zero variance (a zero image with ``σ_b² = 0``) has no defined
angle: keep ``σ_b² > 0`` or the inputs non-zero.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["conv_ntk", "fc_ntk", "krr_loss", "krr_predict", "relu_kernels"]

_KERNELS = ("ntk", "nngp")


def _eps(dtype: torch.dtype) -> float:
    return 1e-10 if dtype == torch.float64 else 1e-6


def relu_kernels(k12: Tensor, k11: Tensor, k22: Tensor) -> tuple[Tensor, Tensor]:
    """The ReLU layer's NNGP map and derivative kernel (arc-cosine kernels of order 1 and 0).

    Args:
        k12: pre-activation covariances ``E[u v]``, any shape.
        k11, k22: the variances ``E[u²]``, ``E[v²]``, broadcastable to ``k12``.

    Returns:
        ``(Σ, Σ̇)`` of ``k12``'s broadcast shape: ``E[relu(u) relu(v)]`` and ``E[relu'(u) relu'(v)]``.
    """
    prod = torch.broadcast_to(k11 * k22, k12.shape)
    gap = prod - k12 * k12
    far = gap >= _eps(k12.dtype) * prod  # else (nearly) parallel: θ = 0 (or π), no gradient through the cusp
    s = torch.sqrt(torch.where(far, gap, 1.0)) * far
    theta = torch.atan2(s, k12)
    sigma = (s + (math.pi - theta) * k12) / (2 * math.pi)
    sigma_dot = (math.pi - theta) / (2 * math.pi)
    return sigma, sigma_dot


def _check_kernel_args(depth: int, weight_var: float, bias_var: float, get: str, who: str) -> None:
    if isinstance(depth, bool) or not isinstance(depth, int) or depth < 0:
        raise ValueError(f"{who}: depth must be an int >= 0 (hidden layers); got {depth!r}")
    if not weight_var > 0:
        raise ValueError(f"{who}: weight_var must be > 0; got {weight_var!r}")
    if not bias_var >= 0:
        raise ValueError(f"{who}: bias_var must be >= 0; got {bias_var!r}")
    if get not in _KERNELS:
        raise ValueError(f"{who}: get must be one of {_KERNELS}; got {get!r}")


def fc_ntk(x1: Tensor, x2: Tensor | None = None, *, depth: int = 1, weight_var: float = 2.0,
           bias_var: float = 1e-4, get: str = "ntk") -> Tensor:
    """The infinite-width NTK (or NNGP) of a fully-connected ReLU network, NTK parameterisation.

    The network: ``depth`` x [dense -> ReLU] -> dense (one output), weights ``N(0, σ_w²/fan_in)``
    in the forward pass and biases ``N(0, σ_b²)``; see the module docstring for the recursion.

    Args:
        x1: ``(N1, ...)`` inputs (flattened to ``(N1, d)``).
        x2: ``(N2, ...)`` inputs, or None for ``x1`` against itself (exactly symmetric then).
        depth: hidden layers (0: a linear model, whose NTK is ``σ_w² x·x'/d + σ_b²``).
        weight_var: ``σ_w²``; bias_var: ``σ_b²``.
        get: ``"ntk"`` or ``"nngp"``.

    Returns:
        ``(N1, N2)`` kernel matrix in the inputs' dtype.
    """
    _check_kernel_args(depth, weight_var, bias_var, get, "fc_ntk")
    a = x1.flatten(1)
    b = a if x2 is None else x2.flatten(1)
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"fc_ntk: inputs of different sizes {tuple(x1.shape[1:])} and {tuple(x2.shape[1:])}")
    dim = a.shape[1]
    k = weight_var * (a @ b.T) / dim + bias_var
    if x2 is None:
        d1 = d2 = torch.diagonal(k)
    else:
        d1 = weight_var * (a * a).sum(1) / dim + bias_var
        d2 = weight_var * (b * b).sum(1) / dim + bias_var
    theta = k
    for _ in range(depth):
        sigma, sigma_dot = relu_kernels(k, d1[:, None], d2[None, :])
        k = weight_var * sigma + bias_var
        theta = k + weight_var * sigma_dot * theta
        # a ReLU of a variance-v Gaussian has E[relu(u)²] = v/2
        d1, d2 = weight_var * d1 / 2 + bias_var, weight_var * d2 / 2 + bias_var
        if x2 is None:
            d1 = d2 = torch.diagonal(k)
    return theta if get == "ntk" else k


# --------------------------------------------------------------------------------------------
# the convolutional NTK on (N1, N2, H, W, H, W) pixel-covariance tensors
# --------------------------------------------------------------------------------------------


def _shift_sum(m: Tensor) -> Tensor:
    """``Σ_{d=-1,0,1} M[..., u+d, v+d]`` over the last two dims ``(U, V)``, zero outside."""
    u, v = m.shape[-2:]
    p = torch.nn.functional.pad(m, (1, 1, 1, 1))
    return p[..., 0:u, 0:v] + p[..., 1:u + 1, 1:v + 1] + p[..., 2:u + 2, 2:v + 2]


def _conv_cov(m: Tensor) -> Tensor:
    """``(1/9) Σ_a M[..., i+a, j+a]`` over the 3x3 offsets ``a`` (the same on both pixels), zero
    outside the image, for ``M (..., H, W, H, W)``: separable into a shift along the columns of
    both pixels and one along their rows."""
    cols = _shift_sum(m.movedim(-3, -2))  # (..., H, H', W, W'): shift the (W, W') plane
    rows = _shift_sum(cols.movedim((-4, -3), (-2, -1)))  # (..., W, W', H, H'): shift the (H, H') plane
    return rows.movedim((-2, -1), (-4, -3)).movedim(-3, -2) / 9.0


def _pool_cov(m: Tensor) -> Tensor:
    """Average pooling 2x2 / stride 2 (floor) applied to both pixels of ``M (..., H, W, H, W)``."""
    h, w = m.shape[-2:]
    if h // 2 == 0 or w // 2 == 0:
        return m
    lead = m.shape[:-4]
    second = torch.nn.functional.avg_pool2d(m.reshape(-1, 1, h, w), 2)  # the second pixel
    h2, w2 = second.shape[-2:]
    second = second.reshape(*lead, h, w, h2 * w2).movedim(-1, -3)  # (..., Q, H, W)
    first = torch.nn.functional.avg_pool2d(second.reshape(-1, 1, h, w), 2)
    return first.reshape(*lead, h2, w2, h2, w2).movedim((-4, -3), (-2, -1))


def _diag(m: Tensor) -> Tensor:
    """The diagonal ``M[..., i, i]`` of ``(..., H, W, H, W)`` as ``(..., H, W)``."""
    h, w = m.shape[-2:]
    flat = m.reshape(*m.shape[:-4], h * w, h * w)
    return torch.diagonal(flat, dim1=-2, dim2=-1).reshape(*m.shape[:-4], h, w)


def _conv_layers(k: Tensor, d1s: list[Tensor] | None, d2s: list[Tensor] | None, depth: int,
                 weight_var: float, bias_var: float, pool: bool, readout: str,
                 ) -> tuple[Tensor, Tensor, list[Tensor]]:
    """Run the CNTK recursion on first-layer covariances ``k (..., H, W, H, W)`` (already
    ``σ_w² A(Σ⁰) + σ_b²``). ``d1s``/``d2s``: each layer's pre-activation variances of the two sides,
    broadcastable to ``k``; None for a self-recursion (``k[n, i, j]`` of an image with itself), whose
    own diagonals are then used and returned. Returns ``(nngp, ntk, diagonals)``."""
    theta = k
    diags: list[Tensor] = []
    for layer in range(depth):
        if d1s is None:
            d = _diag(k)
            diags.append(d)
            v1, v2 = d[..., :, :, None, None], d[..., None, None, :, :]
        else:
            v1, v2 = d1s[layer], d2s[layer]
        sigma, sigma_dot = relu_kernels(k, v1, v2)
        back = sigma_dot * theta
        if pool:
            sigma, back = _pool_cov(sigma), _pool_cov(back)
        if layer + 1 < depth:
            k = weight_var * _conv_cov(sigma) + bias_var
            theta = k + weight_var * _conv_cov(back)
        else:
            k, theta = sigma, back
    if depth == 0:  # no hidden layer: the readout's own parameters are the only ones
        theta = torch.zeros_like(k)
    if readout == "flatten":
        nngp = weight_var * _diag(k).mean(dim=(-2, -1)) + bias_var
        ntk = nngp + weight_var * _diag(theta).mean(dim=(-2, -1))
    else:
        nngp = weight_var * k.mean(dim=(-4, -3, -2, -1)) + bias_var
        ntk = nngp + weight_var * theta.mean(dim=(-4, -3, -2, -1))
    return nngp, ntk, diags


def _first_layer(a: Tensor, b: Tensor, weight_var: float, bias_var: float, depth: int) -> Tensor:
    """``(N1, N2, H, W, H, W)``: the first conv layer's pre-activation covariance (or, with
    ``depth == 0``, the raw ``x·x'/C`` covariance the readout sees)."""
    n, c, h, w = a.shape
    # Σ_c a[n, c, p] b[m, c, q] as one batched matmul: (n, 1, P, C) @ (1, m, C, Q)
    cov = (a.reshape(n, 1, c, h * w).transpose(-1, -2) @ b.reshape(1, b.shape[0], c, h * w)) / c
    cov = cov.reshape(n, b.shape[0], h, w, h, w)
    return weight_var * _conv_cov(cov) + bias_var if depth > 0 else cov


_BUDGET = 2 ** 21  # entries of one (pairs, H, W, H, W) intermediate per block (16 MB in float64)


def _blockwise(fn, *args: Tensor):
    """``fn(*args)``, recomputed in the backward pass instead of keeping its intermediates
    (activation checkpointing) when a gradient is being recorded."""
    if torch.is_grad_enabled() and any(a.requires_grad for a in args):
        from torch.utils.checkpoint import checkpoint

        return checkpoint(fn, *args, use_reentrant=False)
    return fn(*args)


def conv_ntk(x1: Tensor, x2: Tensor | None = None, *, depth: int = 3, weight_var: float = 2.0,
             bias_var: float = 1e-4, pool: bool = True, readout: str = "flatten", get: str = "ntk",
             chunk: int | None = None) -> Tensor:
    """The exact convolutional NTK (or NNGP) of ``depth`` x [conv3x3 -> ReLU -> avgpool2] -> dense.

    NTK parameterisation (conv weights ``N(0, σ_w²/(C·9))``, zero "same" padding, one bias per
    channel ``N(0, σ_b²)``; infinitely many channels); the recursion and its cost are in the
    module docstring. ``depth = 0`` is the linear readout of the raw image.

    Args:
        x1: ``(N1, C, H, W)`` images; x2: ``(N2, C, H, W)`` or None (``x1`` against itself).
        depth: conv blocks; weight_var: ``σ_w²``; bias_var: ``σ_b²``.
        pool: average pooling 2x2/2 after each block's ReLU (skipped once a side is 1 pixel).
        readout: ``"flatten"`` (flatten -> dense, as the DC ConvNet) or ``"gap"`` (global average pool).
        get: ``"ntk"`` or ``"nngp"``.
        chunk: rows of ``x1`` per block (memory: ``chunk · N2 · (HW)²`` entries per intermediate);
            None: as many as fit 2^21 entries. Under autograd each block is checkpointed
            (recomputed in the backward pass), so memory stays at one block's.

    Returns:
        ``(N1, N2)`` kernel in the inputs' dtype.
    """
    _check_kernel_args(depth, weight_var, bias_var, get, "conv_ntk")
    if readout not in ("flatten", "gap"):
        raise ValueError(f"conv_ntk: readout must be 'flatten' or 'gap'; got {readout!r}")
    if x1.dim() != 4 or (x2 is not None and (x2.dim() != 4 or x2.shape[1:] != x1.shape[1:])):
        raise ValueError(f"conv_ntk: images must be (N, C, H, W) of one shape; got {tuple(x1.shape)} and "
                         f"{None if x2 is None else tuple(x2.shape)}")
    if chunk is not None and (isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1):
        raise ValueError(f"conv_ntk: chunk must be a positive int or None; got {chunk!r}")
    other = x1 if x2 is None else x2
    pixels2 = (x1.shape[2] * x1.shape[3]) ** 2
    rows_per = chunk or max(1, _BUDGET // (other.shape[0] * pixels2))
    args = (depth, weight_var, bias_var, pool, readout)
    d_b = _self_diagonals(other, *args)
    d_a_all = d_b if x2 is None else _self_diagonals(x1, *args)
    idx = 0 if get == "nngp" else 1

    def block(a: Tensor, b: Tensor, *diags: Tensor) -> Tensor:
        d1s = [d[:, None, :, :, None, None] for d in diags[:depth]]
        d2s = [d[None, :, None, None, :, :] for d in diags[depth:]]
        return _conv_layers(_first_layer(a, b, weight_var, bias_var, depth), d1s, d2s, *args)[idx]

    rows = []
    for start in range(0, x1.shape[0], rows_per):
        sl = slice(start, start + rows_per)
        rows.append(_blockwise(block, x1[sl], other, *[d[sl] for d in d_a_all], *d_b))
    out = torch.cat(rows, 0)
    return (out + out.T) / 2 if x2 is None else out


def _self_diagonals(x: Tensor, depth: int, weight_var: float, bias_var: float, pool: bool,
                    readout: str) -> list[Tensor]:
    """Each layer's pre-activation variances ``(N, H_l, W_l)`` of every image with itself."""
    if depth == 0:
        return []

    def block(a: Tensor) -> tuple[Tensor, ...]:
        cov = torch.einsum("ncij,nckl->nijkl", a, a) / a.shape[1]
        k0 = weight_var * _conv_cov(cov) + bias_var
        return tuple(_conv_layers(k0, None, None, depth, weight_var, bias_var, pool, readout)[2])

    per = max(1, _BUDGET // (x.shape[2] * x.shape[3]) ** 2)
    parts = [_blockwise(block, x[start:start + per]) for start in range(0, x.shape[0], per)]
    return [torch.cat([p[layer] for p in parts], 0) for layer in range(depth)]


# --------------------------------------------------------------------------------------------
# kernel ridge regression
# --------------------------------------------------------------------------------------------


def krr_predict(k_ts: Tensor, k_ss: Tensor, y_s: Tensor, reg: float = 1e-6) -> Tensor:
    """Kernel ridge regression: ``ŷ_t = K_ts (K_ss + λ I)⁻¹ y_s`` with ``λ = reg · tr(K_ss) / n_s``.

    Args:
        k_ts: ``(N_t, N_s)`` target-support kernel; k_ss: ``(N_s, N_s)`` support kernel.
        y_s: ``(N_s, K)`` support targets.
        reg: the regulariser relative to the mean diagonal of ``K_ss`` (KIP's scaling, authors' code).

    Returns:
        ``(N_t, K)`` predictions.
    """
    n = k_ss.shape[0]
    if k_ss.shape != (n, n) or k_ts.dim() != 2 or k_ts.shape[1] != n or y_s.shape[0] != n:
        raise ValueError(f"krr_predict: shapes k_ts {tuple(k_ts.shape)}, k_ss {tuple(k_ss.shape)}, y_s "
                         f"{tuple(y_s.shape)} do not fit (N_t, N_s), (N_s, N_s), (N_s, K)")
    if not reg >= 0:
        raise ValueError(f"krr_predict: reg must be >= 0; got {reg!r}")
    lam = abs(reg) * torch.trace(k_ss) / n
    eye = torch.eye(n, dtype=k_ss.dtype, device=k_ss.device)
    alpha = torch.linalg.solve(k_ss + lam * eye, y_s.to(k_ss.dtype))
    return k_ts @ alpha


def krr_loss(k_ts: Tensor, k_ss: Tensor, y_s: Tensor, y_t: Tensor, reg: float = 1e-6,
             reduction: str = "mean") -> Tensor:
    """KIP's loss ``½ ‖y_t - K_ts (K_ss + λ I)⁻¹ y_s‖²`` (Nguyen et al. 2021, arXiv 2011.00050).

    Args:
        k_ts, k_ss, y_s, reg: as :func:`krr_predict`; y_t: ``(N_t, K)`` target labels.
        reduction: ``"mean"`` — ``½`` times the mean over the ``N_t · K`` entries, as the authors'
            code (``0.5 * mean((pred - y)²)``); ``"sum"`` — the paper's ``½ ‖·‖²`` (``N_t · K`` times
            larger; Adam, which KIP uses, is invariant to that factor).

    Returns:
        the scalar loss.
    """
    if reduction not in ("mean", "sum"):
        raise ValueError(f"krr_loss: reduction must be 'mean' or 'sum'; got {reduction!r}")
    pred = krr_predict(k_ts, k_ss, y_s, reg)
    if pred.shape != y_t.shape:
        raise ValueError(f"krr_loss: predictions {tuple(pred.shape)} but targets {tuple(y_t.shape)}")
    sq = (pred - y_t.to(pred.dtype)) ** 2
    return 0.5 * (sq.mean() if reduction == "mean" else sq.sum())
