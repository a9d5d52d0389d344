"""Activation metadata and the data-free reconstruction of Lopes, Fenu & Starner.

Paper: R. G. Lopes, S. Fenu, T. Starner, "Data-Free Knowledge Distillation for Deep Neural
Networks", NIPS 2017 LLD workshop, arXiv 1710.07535. At training time the model's owner records
*metadata*: statistics of the teacher's activations on its training data, per class. Later,
without the data, inputs are reconstructed by optimising random noise so that the teacher's
activations on it match activations drawn from the recorded statistics, and a student is distilled
on the reconstructions. Three kinds of metadata (``objective``):

* ``"top_layer"``: per class ``c`` the mean ``mu_c`` and covariance ``Sigma_c`` of the top layer
  (the logits, ``(K,)``); a target ``h ~ N(mu_c, Sigma_c)`` is drawn per image and
  ``L(x) = mean_{b,k} (f(x)_{b,k} - h_{b,k})^2``.
* ``"all_layers"``: the same statistics for every recorded layer ``l`` (flattened outputs of
  ``nn.Linear`` / ``nn.Conv2d`` modules, ``n_l`` units) plus the top layer, one independent draw
  per layer, and ``L(x) = sum_l mean_{b,i} (a_l(x)_{b,i} - h_{l,b,i})^2``.
* ``"spectral"``: the network's units as the nodes of a graph whose edges are the absolute weights
  ``|W|`` of a chain of ``nn.Linear`` layers; its Laplacian ``L = D - A = U Lambda U^T``; the graph
  Fourier transform of the activation signal ``s(x)`` (the chain's input and every layer's
  output, concatenated, ``(n,)``) is ``U_k^T s(x)`` on the ``k`` lowest-frequency eigenvectors.
  The metadata are ``U_k`` and, per class, the mean and standard deviation of the ``k``
  coefficients; ``L(x) = mean_{b,j} ((s(x) U_k)_{b,j} - c_{b,j})^2`` with ``c`` drawn per image.

Only the abstract of the paper could be read here; the objectives and defaults follow the
authors' code (github.com/iRapha/replayed_distillation, ``procedures/compute_stats.py``,
``_optimization_objectives.py``, ``optimize_dataset.py``), with these departures:

* the authors' code samples ``mu_c + z @ Sigma_c``; we draw a proper Gaussian sample
  ``mu_c + Chol(Sigma_c) z`` (with ``z ~ N(0, I)``);
* the code compares ``relu(a)`` with ``relu(h)`` and weights each layer by ``1/n_l`` *and* a mean
  (``1/n_l^2`` overall); we compare the raw activations with one mean per layer;
* the code's spectral objectives are unfinished (they optimise the all-layers loss; the graph of
  ``compute_graphwise_statistics`` is built per class from outer products of mean activations and
  calls an undefined ``downscale_factor``). Our spectral metadata follow the paper's description
  (the weights' graph, a truncated graph Fourier basis), so ``k`` (``spectral_fraction``) is ours;
* layers wider than ``max_cov_units`` store a diagonal (per-unit std) instead of a covariance, as
  the code does for layers whose covariance is not positive definite.

Defaults of the synthesizer from the authors' code: 1000 Adam steps per batch (``optimize_dataset``),
learning rate 0.07 (the code's comment "og lr was 0.07"), batches of 64 images of one class.
The metadata file (safetensors, nothing executes on load) is the only thing the synthesizer reads
besides the teacher.
"""

from __future__ import annotations

import itertools
import json
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from distill.data.synthetic import SyntheticSet
from distill.papers import Paper
from distill.synthesis._checks import check_int
from distill.synthesis.progress import StepProgress
from distill.synthesis.registry import register_synthesizer, teacher_fingerprint

__all__ = ["LOPES_2017", "OBJECTIVES", "ActivationMetadata", "LayerStats", "SpectralStats", "all_layers_loss",
           "laplacian_basis", "load_metadata", "lopes_metadata", "record_metadata", "sample_layer",
           "spectral_loss", "top_layer_loss"]

LOPES_2017 = Paper(
    title="Data-Free Knowledge Distillation for Deep Neural Networks",
    authors="R. G. Lopes, S. Fenu, T. Starner",
    year=2017,
    arxiv="1710.07535",
    venue="NIPS LLD Workshop",
)

OBJECTIVES = ("top_layer", "all_layers", "spectral")
TOP = "output"
_FORMAT = "distill.lopes_metadata/1"


@dataclass
class LayerStats:
    """Per-class statistics of one layer's flattened activations (``n`` units, ``K`` classes).

    ``mean`` ``(K, n)``; ``scale`` ``(K, n, n)``: the lower Cholesky factor of each class's
    (biased) covariance, or ``None`` when only ``std`` ``(K, n)`` (per-unit) is kept."""

    mean: Tensor
    std: Tensor
    scale: Tensor | None = None


@dataclass
class SpectralStats:
    """The graph Fourier metadata: ``layers`` (the ``nn.Linear`` chain), ``basis`` ``U_k`` ``(n, k)``,
    ``eigenvalues`` ``(k,)``, and per class the coefficients' ``mean`` and ``std`` ``(K, k)``."""

    layers: list[str]
    basis: Tensor
    eigenvalues: Tensor
    mean: Tensor
    std: Tensor


@dataclass
class ActivationMetadata:
    """What :func:`record_metadata` records: per-layer statistics (``layers[TOP]`` is the logits),
    optional spectral statistics, the class count and the teacher's fingerprint."""

    num_classes: int
    layers: dict[str, LayerStats]
    spectral: SpectralStats | None = None
    teacher: str = ""
    info: dict[str, Any] = field(default_factory=dict)

    def save(self, path: str | Path, overwrite: bool = False) -> Path:
        """Write the metadata as one safetensors file (tensors + a JSON header); refuses an existing
        file unless ``overwrite``."""
        from safetensors.torch import save_file

        path = Path(path)
        if path.exists() and not overwrite:
            raise FileExistsError(f"{path} exists; pass overwrite=True to replace it")
        tensors: dict[str, Tensor] = {}
        for name, st in self.layers.items():
            tensors[f"layer.{name}.mean"] = st.mean
            tensors[f"layer.{name}.std"] = st.std
            if st.scale is not None:
                tensors[f"layer.{name}.scale"] = st.scale
        if self.spectral is not None:
            for key in ("basis", "eigenvalues", "mean", "std"):
                tensors[f"spectral.{key}"] = getattr(self.spectral, key)
        header = {"format": _FORMAT, "num_classes": str(self.num_classes), "layers": json.dumps(list(self.layers)),
                  "spectral_layers": json.dumps(self.spectral.layers if self.spectral else None),
                  "teacher": self.teacher, "info": json.dumps(self.info)}
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file({k: v.detach().float().contiguous().cpu() for k, v in tensors.items()}, str(path), metadata=header)
        return path


def load_metadata(path: str | Path) -> ActivationMetadata:
    """Read a file written by :meth:`ActivationMetadata.save` (safetensors: no code runs)."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no activation metadata file at {path}")
    with safe_open(str(path), framework="pt") as f:
        header = f.metadata() or {}
        if header.get("format") != _FORMAT:
            raise ValueError(f"{path} is not a distill activation-metadata file (format {header.get('format')!r}, "
                             f"expected {_FORMAT!r})")
        t = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (a safetensors handle)
    layers = {name: LayerStats(t[f"layer.{name}.mean"], t[f"layer.{name}.std"], t.get(f"layer.{name}.scale"))
              for name in json.loads(header["layers"])}
    spectral_layers = json.loads(header["spectral_layers"])
    spectral = None if spectral_layers is None else SpectralStats(
        spectral_layers, t["spectral.basis"], t["spectral.eigenvalues"], t["spectral.mean"], t["spectral.std"])
    return ActivationMetadata(int(header["num_classes"]), layers, spectral, header.get("teacher", ""),
                              json.loads(header.get("info", "{}")))


# ---------------------------------------------------------------- recording

def _default_layers(model: nn.Module) -> list[str]:
    return [name for name, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d)) and name]


def _linear_chain(model: nn.Module, names: Sequence[str] | None) -> list[str]:
    """The ``nn.Linear`` chain of the spectral graph: ``names`` checked, or the longest run of
    consecutive ``nn.Linear`` modules at the end of ``named_modules()`` whose widths connect."""
    modules = dict(model.named_modules())
    if names is not None:
        chain = list(names)
        for n in chain:
            if not isinstance(modules.get(n), nn.Linear):
                raise ValueError(  # noqa: TRY004 (a wrong name, not a wrong argument type)f"spectral layer {n!r} is not an nn.Linear of {type(model).__name__}; "
                                 f"its Linear layers: {[k for k, m in modules.items() if isinstance(m, nn.Linear)]}")
    else:
        linears = [n for n, m in modules.items() if isinstance(m, nn.Linear)]
        if not linears:
            raise ValueError(f"{type(model).__name__} has no nn.Linear layer to build the spectral graph from; "
                             f"pass spectral=False")
        chain = [linears[-1]]
        for n in reversed(linears[:-1]):
            if modules[n].out_features != modules[chain[0]].in_features:
                break
            chain.insert(0, n)
    for a, b in itertools.pairwise(chain):
        if modules[a].out_features != modules[b].in_features:
            raise ValueError(f"spectral layers {a!r} ({modules[a].out_features} outputs) and {b!r} "
                             f"({modules[b].in_features} inputs) are not connected")
    return chain


def laplacian_basis(weights: Sequence[Tensor], k: int) -> tuple[Tensor, Tensor]:
    """The ``k`` lowest-frequency eigenpairs of the graph of a chain of linear layers.

    Nodes: the first layer's ``in`` units, then every layer's ``out`` units (``n`` in all). Edge
    ``(i, j)`` between an input unit ``i`` and an output unit ``j`` of layer ``W`` ``(out, in)``
    has weight ``|W_ji|``; ``L = D - A`` (combinatorial Laplacian).

    Returns:
        ``(eigenvalues (k,), basis (n, k))``, eigenvalues ascending, basis orthonormal columns.
    """
    sizes = [int(weights[0].shape[1])] + [int(w.shape[0]) for w in weights]
    n = sum(sizes)
    if not 1 <= k <= n:
        raise ValueError(f"k must be in [1, {n}] (the graph's node count); got {k}")
    adj = torch.zeros(n, n, dtype=torch.float64)
    start = 0
    for w, n_in in zip(weights, sizes):
        n_out = int(w.shape[0])
        block = w.detach().abs().to(torch.float64).t()  # (in, out)
        adj[start:start + n_in, start + n_in:start + n_in + n_out] = block
        adj[start + n_in:start + n_in + n_out, start:start + n_in] = block.t()
        start += n_in
    lap = torch.diag(adj.sum(1)) - adj
    vals, vecs = torch.linalg.eigh(lap)
    return vals[:k].float(), vecs[:, :k].float()


class _Recorder:
    """Forward hooks capturing the flattened outputs of ``layers`` and the spectral chain's signal."""

    def __init__(self, model: nn.Module, layers: Sequence[str], chain: Sequence[str]) -> None:
        modules = dict(model.named_modules())
        for n in list(layers) + list(chain):
            if n not in modules:
                raise ValueError(f"{type(model).__name__} has no submodule {n!r}")
        self.out: dict[str, Tensor] = {}
        self.chain_input: Tensor | None = None
        self.handles = [modules[n].register_forward_hook(self._keep(n)) for n in dict.fromkeys([*layers, *chain])]
        if chain:
            self.handles.append(modules[chain[0]].register_forward_hook(self._keep_input))

    def _keep(self, name: str) -> Any:
        def hook(module: nn.Module, inputs: tuple[Tensor, ...], output: Tensor) -> None:
            self.out[name] = output.flatten(1)
        return hook

    def _keep_input(self, module: nn.Module, inputs: tuple[Tensor, ...], output: Tensor) -> None:
        self.chain_input = inputs[0].flatten(1)

    def signal(self, chain: Sequence[str]) -> Tensor:
        """The spectral signal ``s(x)``: chain input and every chain layer's output, ``(B, n)``."""
        assert self.chain_input is not None
        return torch.cat([self.chain_input, *[self.out[n] for n in chain]], dim=1)

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


class _ClassMoments:
    """Running per-class sums (float64) of ``a``, ``a^2`` and, when ``full``, ``a a^T``."""

    def __init__(self, num_classes: int, n: int, full: bool) -> None:
        self.count = torch.zeros(num_classes, dtype=torch.float64)
        self.s1 = torch.zeros(num_classes, n, dtype=torch.float64)
        self.s2 = torch.zeros((num_classes, n, n) if full else (num_classes, n), dtype=torch.float64)
        self.full = full

    def add(self, a: Tensor, y: Tensor) -> None:
        a = a.detach().to(torch.float64).cpu()
        y = y.cpu()
        self.count.index_add_(0, y, torch.ones_like(y, dtype=torch.float64))
        self.s1.index_add_(0, y, a)
        if self.full:
            self.s2.index_add_(0, y, a[:, :, None] * a[:, None, :])
        else:
            self.s2.index_add_(0, y, a * a)

    def stats(self, eps: float) -> LayerStats:
        c = self.count[:, None]
        mean = self.s1 / c
        if self.full:
            cov = self.s2 / c[:, :, None] - mean[:, :, None] * mean[:, None, :]
            var = cov.diagonal(dim1=1, dim2=2).clamp_min(0)
            eye = torch.eye(cov.shape[1], dtype=cov.dtype)
            scale = torch.linalg.cholesky(cov + eps * eye)
            return LayerStats(mean.float(), var.sqrt().float(), scale.float())
        var = (self.s2 / c - mean * mean).clamp_min(0)
        return LayerStats(mean.float(), var.sqrt().float(), None)


def _batches(data: Any, batch_size: int) -> Iterable[tuple[Tensor, Tensor]]:
    if isinstance(data, tuple) and len(data) == 2 and all(isinstance(t, Tensor) for t in data):
        x, y = data
        if x.shape[0] != y.shape[0]:
            raise ValueError(f"images ({x.shape[0]}) and labels ({y.shape[0]}) differ in length")
        for i in range(0, x.shape[0], batch_size):
            yield x[i:i + batch_size], y[i:i + batch_size]
        return
    for b in data:
        if isinstance(b, (tuple, list)):
            yield b[0], b[1]
        else:
            yield b.inputs, b.targets


@torch.no_grad()
def record_metadata(model: nn.Module, data: Any, *, num_classes: int, layers: Sequence[str] | None = None,
                    spectral: bool = True, spectral_layers: Sequence[str] | None = None,
                    spectral_fraction: float = 0.5, max_cov_units: int = 512, eps: float = 1e-4,
                    batch_size: int = 256, device: str | torch.device | None = None,
                    path: str | Path | None = None, overwrite: bool = False) -> ActivationMetadata:
    """Record the activation metadata of ``model`` on its training data (the model owner's step).

    For each class ``c`` and layer ``l`` (the logits ``"output"`` and every name in ``layers``,
    flattened to ``n_l`` units): ``mean_c = (1/N_c) sum_{i: y_i = c} a_i`` and the biased covariance
    ``(1/N_c) sum (a_i - mean_c)(a_i - mean_c)^T``, kept as its Cholesky factor after adding
    ``eps * I`` (only the per-unit std when ``n_l > max_cov_units``). With ``spectral``: the Laplacian
    basis ``U_k`` of the ``nn.Linear`` chain (:func:`laplacian_basis`, ``k = ceil(spectral_fraction * n)``)
    and per class the mean and std of the coefficients ``s(x) U_k``.

    Args:
        model: the trained teacher; run in eval mode (its mode is restored), never modified.
        data: ``(images (N, C, H, W), labels (N,))`` tensors, or an iterable of ``(x, y)`` batches /
            :class:`~distill.batch.Batch`.
        num_classes: ``K``; every class must have at least one sample.
        layers: module paths whose outputs are recorded (default: every ``nn.Linear`` / ``nn.Conv2d``
            except one whose output is the logits themselves).
        spectral, spectral_layers, spectral_fraction: the spectral metadata and its ``nn.Linear``
            chain (default: the trailing connected chain of ``nn.Linear`` modules).
        path: when given, also saved there (safetensors).

    Returns:
        the :class:`ActivationMetadata`.
    """
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"num_classes must be a positive int; got {num_classes!r}")
    if not 0 < spectral_fraction <= 1:
        raise ValueError(f"spectral_fraction must be in (0, 1]; got {spectral_fraction!r}")
    layer_names = list(_default_layers(model) if layers is None else layers)
    chain = _linear_chain(model, spectral_layers) if spectral else []
    dev = torch.device(device) if device is not None else next(model.parameters()).device
    was_training = model.training
    model.eval()
    rec = _Recorder(model, layer_names, chain)
    moments: dict[str, _ClassMoments] = {}
    spec_moments: _ClassMoments | None = None
    basis: Tensor | None = None
    eigvals: Tensor | None = None
    if chain:
        modules = dict(model.named_modules())
        weights = [modules[n].weight for n in chain]
        n_nodes = int(weights[0].shape[1]) + sum(int(w.shape[0]) for w in weights)
        eigvals, basis = laplacian_basis(weights, max(1, math.ceil(spectral_fraction * n_nodes)))
    try:
        for x, y in _batches(data, batch_size):
            y = torch.as_tensor(y).long()
            if y.numel() and (int(y.min()) < 0 or int(y.max()) >= num_classes):
                raise ValueError(f"labels must lie in [0, {num_classes}); got {int(y.min())}..{int(y.max())}")
            logits = model(x.to(dev))
            acts = {TOP: logits.flatten(1)}
            if not moments:  # a layer whose output *is* the logits is recorded once, as "output"
                layer_names = [n for n in layer_names if not torch.equal(rec.out[n], acts[TOP])]
            acts.update({n: rec.out[n] for n in layer_names})
            for n, a in acts.items():
                if n not in moments:
                    moments[n] = _ClassMoments(num_classes, a.shape[1], a.shape[1] <= max_cov_units)
                moments[n].add(a, y)
            if chain:
                assert basis is not None
                coef = rec.signal(chain).float().cpu() @ basis
                if spec_moments is None:
                    spec_moments = _ClassMoments(num_classes, coef.shape[1], False)
                spec_moments.add(coef, y)
    finally:
        rec.remove()
        model.train(was_training)
    if TOP not in moments:
        raise ValueError("no training sample was given")
    empty = [c for c in range(num_classes) if moments[TOP].count[c] == 0]
    if empty:
        raise ValueError(f"classes {empty} have no training sample: their statistics cannot be recorded")
    stats = {n: moments[n].stats(eps) for n in [TOP, *layer_names]}
    spec = None
    if chain:
        assert spec_moments is not None and basis is not None and eigvals is not None
        s = spec_moments.stats(eps)
        spec = SpectralStats(list(chain), basis, eigvals, s.mean, s.std)
    meta = ActivationMetadata(num_classes, stats, spec, teacher_fingerprint(model),
                              {"samples_per_class": moments[TOP].count.long().tolist(), "eps": eps})
    if path is not None:
        meta.save(path, overwrite=overwrite)
    return meta


# ---------------------------------------------------------------- the objectives

def sample_layer(stats: LayerStats, classes: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """One draw per image from its class's Gaussian: ``mean_c + scale_c z`` (or ``mean_c + std_c * z``
    without a covariance), ``z ~ N(0, I)``; ``classes`` ``(B,)`` -> ``(B, n)``."""
    mean = stats.mean[classes]
    z = torch.randn(mean.shape, generator=generator, dtype=mean.dtype)
    if stats.scale is not None:
        return mean + torch.einsum("bij,bj->bi", stats.scale[classes], z)
    return mean + stats.std[classes] * z


def top_layer_loss(logits: Tensor, target: Tensor) -> Tensor:
    """``mean_{b,k} (logits - target)^2`` for logits and drawn targets ``(B, K)``."""
    return (logits - target).pow(2).mean()


def all_layers_loss(acts: Sequence[Tensor], targets: Sequence[Tensor]) -> Tensor:
    """``sum_l mean_{b,i} (a_l - h_l)^2`` over layers (each ``(B, n_l)``)."""
    if len(acts) != len(targets) or not acts:
        raise ValueError(f"all_layers_loss needs one target per layer; got {len(acts)} and {len(targets)}")
    return sum(((a - h).pow(2).mean() for a, h in zip(acts, targets)), torch.zeros(()))


def spectral_loss(signal: Tensor, basis: Tensor, target: Tensor) -> Tensor:
    """``mean_{b,j} ((signal U_k)_{b,j} - c_{b,j})^2``: signal ``(B, n)``, basis ``(n, k)``, target ``(B, k)``."""
    return (signal @ basis - target).pow(2).mean()


@register_synthesizer("lopes_metadata", "data-free", LOPES_2017)
def lopes_metadata(teacher: nn.Module, *, ipc: int, num_classes: int, image_shape: tuple[int, int, int],
                   seed: int = 0, progress: bool = True, metadata: str | Path | ActivationMetadata | None = None,
                   objective: str = "all_layers", steps: int = 1000, lr: float = 0.07, batch_size: int = 64,
                   init_mean: float = 0.0, init_std: float = 1.0, device: str | torch.device | None = None) -> SyntheticSet:
    """Reconstruct ``ipc`` inputs per class from the teacher and its activation metadata.

    Per class ``c`` and batch of up to ``batch_size`` images: ``x ~ N(init_mean, init_std^2)`` of shape
    ``(B, *image_shape)`` (in the teacher's normalised input space; the authors' MNIST code starts
    from pixels ``N(0.15, 0.1^2)``, i.e. ``init_mean = (0.15 - m) / s``, ``init_std = 0.1 / s`` for the
    data's mean ``m`` and std ``s``), one draw of the targets from
    the class's metadata (kept for the whole batch, as the authors' code does), then ``steps`` Adam
    steps on ``x`` minimising the ``objective``'s loss (module docstring). Labels are ``c``.

    Args:
        teacher: the trained teacher (eval mode during synthesis; its weights are never changed).
        metadata: the file written by :func:`record_metadata` (or the object itself); required.
        objective: ``"top_layer"``, ``"all_layers"`` or ``"spectral"``.
        steps, lr, batch_size: Adam steps per batch, its learning rate, images per batch.

    Returns:
        a :class:`~distill.data.synthetic.SyntheticSet` of ``ipc * num_classes`` images; the manifest
        holds the settings and ``objective_initial`` / ``objective_final`` (mean loss of the batches
        at their first and last step).
    """
    if objective not in OBJECTIVES:
        raise ValueError(f"objective must be one of {OBJECTIVES}; got {objective!r}")
    if metadata is None:
        raise ValueError("lopes_metadata needs metadata=: the safetensors file written by record_metadata "
                         "on the teacher's training data")
    meta = metadata if isinstance(metadata, ActivationMetadata) else load_metadata(metadata)
    check_int("ipc", ipc)
    check_int("steps", steps)
    check_int("batch_size", batch_size)
    if meta.num_classes != num_classes:
        raise ValueError(f"the metadata has {meta.num_classes} classes, num_classes={num_classes}")
    if objective == "spectral" and meta.spectral is None:
        raise ValueError("objective='spectral' needs spectral metadata: record it with spectral=True")
    if len(image_shape) != 3:
        raise ValueError(f"image_shape must be (C, H, W); got {image_shape!r}")
    fingerprint = teacher_fingerprint(teacher)
    if meta.teacher and meta.teacher != fingerprint:
        raise ValueError("the metadata were recorded on another teacher (fingerprints differ)")
    dev = torch.device(device) if device is not None else next(teacher.parameters()).device
    layers = [n for n in meta.layers if n != TOP]
    chain = meta.spectral.layers if (objective == "spectral" and meta.spectral) else []
    was_training = teacher.training
    teacher.eval()
    rec = _Recorder(teacher, layers if objective == "all_layers" else [], chain)
    gen = torch.Generator().manual_seed(seed)
    images, labels, first, last = [], [], [], []
    plan = [(c, min(batch_size, ipc - i)) for c in range(num_classes) for i in range(0, ipc, batch_size)]
    try:
        with StepProgress(progress, f"lopes_metadata ({objective})", len(plan) * steps) as bar:
            for c, b in plan:
                cls = torch.full((b,), c, dtype=torch.long)
                if objective == "top_layer":
                    targets = [sample_layer(meta.layers[TOP], cls, gen)]
                elif objective == "all_layers":
                    targets = [sample_layer(meta.layers[n], cls, gen) for n in [TOP, *layers]]
                else:
                    assert meta.spectral is not None
                    sp = meta.spectral
                    targets = [sample_layer(LayerStats(sp.mean, sp.std), cls, gen)]
                targets = [t.to(dev) for t in targets]
                x = torch.randn((b, *image_shape), generator=gen) * init_std + init_mean
                x = x.to(dev).requires_grad_(True)
                opt = torch.optim.Adam([x], lr=lr)
                for step in range(steps):
                    logits = teacher(x)
                    if objective == "top_layer":
                        loss = top_layer_loss(logits.flatten(1), targets[0])
                    elif objective == "all_layers":
                        acts = [logits.flatten(1), *[rec.out[n] for n in layers]]
                        loss = all_layers_loss(acts, targets)
                    else:
                        assert meta.spectral is not None
                        loss = spectral_loss(rec.signal(chain), meta.spectral.basis.to(dev), targets[0])
                    (grad,) = torch.autograd.grad(loss, [x])
                    if step == 0:
                        first.append(float(loss.detach()))
                    x.grad = grad
                    opt.step()
                    bar.advance(f"class {c} loss {float(loss.detach()):.4g}")
                with torch.no_grad():
                    logits = teacher(x)
                    last.append(float(top_layer_loss(logits.flatten(1), targets[0]) if objective == "top_layer"
                                      else all_layers_loss([logits.flatten(1), *[rec.out[n] for n in layers]], targets)
                                      if objective == "all_layers" else
                                      spectral_loss(rec.signal(chain), meta.spectral.basis.to(dev), targets[0])))
                images.append(x.detach().cpu())
                labels.append(cls)
    finally:
        rec.remove()
        teacher.train(was_training)
    manifest = {"method": "lopes_metadata", "family": "data-free", "teacher": {"fingerprint": fingerprint},
                "num_classes": num_classes, "ipc": ipc,
                "settings": {"image_shape": list(image_shape), "seed": seed, "objective": objective,
                             "steps": steps, "lr": lr, "batch_size": batch_size, "init_mean": init_mean,
                             "init_std": init_std},
                "objective_initial": sum(first) / len(first), "objective_final": sum(last) / len(last)}
    return SyntheticSet(torch.cat(images).float(), torch.cat(labels), manifest)
