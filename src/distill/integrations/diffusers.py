"""Diffusion models from Hugging Face ``diffusers``: a small class-conditional ``UNet2DModel`` in the
continuous-time v-parametrisation, optionally conditioned on a guidance strength ``w``.

``diffusers`` is imported only when a model is built (:func:`distill.integrations.require`), so
``import distill`` never needs it; an absent package is a clear ``pip install 'distill[generative]'``.
Nothing is downloaded: the UNet is built from its config with fresh weights.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from distill.integrations import require

__all__ = ["DiffusionUNet", "build_unet", "ddim_scheduler"]

TIME_SCALE = 1000.0  # t in [0, 1] enters diffusers' sinusoidal time embedding as t * 1000 (its usual range)


def _diffusers(what: str) -> Any:
    return require("diffusers", "generative", what)


class DiffusionUNet(nn.Module):
    """A ``diffusers.UNet2DModel`` predicting ``v`` from ``(z_t, t, label, w)``.

    * ``t`` ``(B,)`` in [0, 1] (continuous time, cosine schedule: :mod:`distill.functional.diffusion`) is
      embedded by the UNet's own sinusoidal time embedding at ``t * 1000``.
    * ``labels`` ``(B,)`` long in ``0..num_classes``, where ``num_classes`` itself is the "null" label of
      classifier-free guidance (the unconditional model); ``None`` means all null. A learned embedding of
      the label (``nn.Embedding(num_classes + 1, E)``) is added to the time embedding, through the UNet's
      ``class_embed_type="identity"`` input.
    * ``w`` ``(B,)`` (only when ``w_conditioned``): Meng et al.'s guidance-strength input. Its Fourier
      (sinusoidal) features at ``w * w_scale`` go through an MLP (diffusers' ``Timesteps`` +
      ``TimestepEmbedding``) and are added to the time embedding, the way the time step enters (as the paper
      describes its ``w`` conditioning). The MLP's last layer starts at zero, so a student copied from the
      teacher (:meth:`with_guidance_input`) starts as the teacher's conditional model (our choice).

    ``forward(z, t, labels=None, w=None) -> v_hat`` ``(B, C, H, W)``.
    """

    def __init__(self, unet: nn.Module, num_classes: int, w_conditioned: bool = False, w_scale: float = 250.0) -> None:
        super().__init__()
        self.unet = unet
        self.num_classes = int(num_classes)
        self.w_scale = float(w_scale)
        emb_dim = unet.time_embedding.linear_2.out_features
        self.label_embed = nn.Embedding(self.num_classes + 1, emb_dim)
        self.w_proj: nn.Module | None = None
        self.w_embed: nn.Module | None = None
        if w_conditioned:
            self._add_w_embedding()

    @property
    def w_conditioned(self) -> bool:
        return self.w_embed is not None

    def _add_w_embedding(self) -> None:
        emb = _diffusers("guidance-strength embedding").models.embeddings
        ch = self.unet.config.block_out_channels[0]
        emb_dim = self.unet.time_embedding.linear_2.out_features
        self.w_proj = emb.Timesteps(ch, flip_sin_to_cos=True, downscale_freq_shift=0)
        self.w_embed = emb.TimestepEmbedding(ch, emb_dim)
        nn.init.zeros_(self.w_embed.linear_2.weight)
        nn.init.zeros_(self.w_embed.linear_2.bias)
        self.w_embed.to(self.label_embed.weight.device)

    def with_guidance_input(self, w_scale: float | None = None) -> DiffusionUNet:
        """A copy of this model with a (zero-initialised) ``w`` input: Meng et al.'s stage-one student."""
        import copy

        if self.w_conditioned:
            raise ValueError("with_guidance_input: this model already takes a guidance strength w")
        new = copy.deepcopy(self)
        if w_scale is not None:
            new.w_scale = float(w_scale)
        new._add_w_embedding()
        return new

    def forward(self, z: Tensor, t: Tensor, labels: Tensor | None = None, w: Tensor | None = None) -> Tensor:
        b = z.shape[0]
        t = torch.as_tensor(t, dtype=z.dtype, device=z.device).expand(b) if torch.as_tensor(t).dim() == 0 else t
        if labels is None:
            labels = torch.full((b,), self.num_classes, dtype=torch.long, device=z.device)
        if labels.shape != (b,) or labels.dtype != torch.long:
            raise ValueError(f"DiffusionUNet: labels must be a long tensor shaped ({b},); got {labels.dtype} "
                             f"{tuple(labels.shape)}")
        cond = self.label_embed(labels)
        if self.w_embed is not None:
            if w is None:
                raise ValueError("DiffusionUNet: this model is w-conditioned (Meng et al.'s student): pass w (B,)")
            w = torch.as_tensor(w, dtype=z.dtype, device=z.device).expand(b)
            cond = cond + self.w_embed(self.w_proj(w * self.w_scale).to(z.dtype))
        elif w is not None:
            raise ValueError("DiffusionUNet: w given to a model without a guidance-strength input")
        return self.unet(z, t * TIME_SCALE, class_labels=cond).sample


def build_unet(img_size: int = 16, channels: int = 1, num_classes: int = 10,
               block_out_channels: tuple[int, ...] = (32, 64), layers_per_block: int = 1, attention: bool = True,
               norm_num_groups: int = 8, w_conditioned: bool = False, w_scale: float = 250.0) -> DiffusionUNet:
    """A small class-conditional ``diffusers.UNet2DModel`` wrapped as :class:`DiffusionUNet`.

    ``img_size`` must be divisible by ``2 ** (len(block_out_channels) - 1)`` (one downsampling per extra
    level). ``attention`` puts self-attention in the lowest-resolution level (and the mid block).
    The sizes (two levels of 32/64 channels, one ResNet layer per level) are ours, for CPU runs.
    """
    diffusers = _diffusers("build_unet (diffusion distillation)")
    levels = len(block_out_channels)
    if levels < 1 or img_size % (2 ** (levels - 1)):
        raise ValueError(f"build_unet: img_size {img_size} must be divisible by 2**(levels-1) = {2 ** (levels - 1)} "
                         f"for block_out_channels {block_out_channels}")
    if any(c % norm_num_groups for c in block_out_channels):
        raise ValueError(f"build_unet: every entry of block_out_channels {block_out_channels} must be divisible by "
                         f"norm_num_groups={norm_num_groups}")
    down = ["DownBlock2D"] * levels
    up = ["UpBlock2D"] * levels
    if attention and levels > 1:
        down[-1], up[0] = "AttnDownBlock2D", "AttnUpBlock2D"
    unet = diffusers.UNet2DModel(sample_size=img_size, in_channels=channels, out_channels=channels,
                                 block_out_channels=tuple(block_out_channels), layers_per_block=layers_per_block,
                                 down_block_types=tuple(down), up_block_types=tuple(up), norm_num_groups=norm_num_groups,
                                 attention_head_dim=8, add_attention=attention, class_embed_type="identity")
    return DiffusionUNet(unet, num_classes, w_conditioned=w_conditioned, w_scale=w_scale)


def ddim_scheduler(alphas_cumprod: Tensor, prediction_type: str = "v_prediction") -> Any:
    """A ``diffusers.DDIMScheduler`` whose cumulative alphas are ``alphas_cumprod`` ``(T,)`` (e.g. the cosine
    schedule's ``alpha_t^2`` on a grid), ``eta = 0`` sampling, no clipping: the reference our continuous-time
    DDIM step is checked against."""
    diffusers = _diffusers("ddim_scheduler")
    ac = torch.as_tensor(alphas_cumprod, dtype=torch.float64)
    prev = torch.cat([torch.ones(1, dtype=ac.dtype), ac[:-1]])
    betas = (1 - ac / prev).clamp(0, 1)
    return diffusers.DDIMScheduler(num_train_timesteps=len(ac), trained_betas=betas.tolist(), clip_sample=False,
                                   set_alpha_to_one=True, prediction_type=prediction_type, timestep_spacing="leading")
