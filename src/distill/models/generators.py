"""Image generators of data-free distillation: DAFL's and DFAD's (one family).

Both papers use the same small upsampling generator (read from the authors' code; the papers
give no layer table):

* DAFL: Chen et al., "Data-Free Learning of Student Networks", ICCV 2019, arXiv 1904.01186;
  ``Generator`` of ``DAFL/DAFL-train.py`` in huawei-noah's Data-Efficient-Model-Compression.
* DFAD: Fang et al., "Data-Free Adversarial Distillation", 2019, arXiv 1912.11006;
  ``GeneratorA`` of ``network/gan.py`` in VainF/Data-Free-Adversarial-Distillation.

Layers, for ``s = image_size // 4`` and width ``w``::

    z (B, latent_dim) -> Linear(latent_dim, w*s*s) -> view (B, w, s, s) -> BN(w)
      -> nearest upsample x2 -> Conv3x3(w, w) -> BN(w) -> LeakyReLU(0.2)
      -> nearest upsample x2 -> Conv3x3(w, w/2) -> BN(w/2) -> LeakyReLU(0.2)
      -> Conv3x3(w/2, C) -> tanh -> BN(C, affine=False)     -> (B, C, image_size, image_size)

The only difference: DAFL's code builds the two hidden BNs as ``BatchNorm2d(n, 0.8)``, whose
second positional argument is ``eps`` (0.8, not the momentum), so ``dafl_generator`` keeps
``eps=0.8`` there; DFAD's uses the default ``eps=1e-5``. The last BN (no affine) standardises
each output channel over the batch in training mode, so outputs are not bounded by tanh's
``[-1, 1]``: in training mode each channel has batch mean 0 and variance ~1.
"""

from __future__ import annotations

from torch import Tensor, nn
from torch.nn import functional as F

from distill.models.registry import register_model

__all__ = ["ConvGenerator", "dafl_generator", "dfad_generator"]


class ConvGenerator(nn.Module):
    """The DAFL/DFAD generator (see the module docstring for its layers).

    Args:
        latent_dim: size of the noise vector ``z``.
        image_size: output height and width; a multiple of 4 (28 for MNIST, 32 for CIFAR).
        channels: output channels (1 or 3).
        width: channels of the first feature map (DAFL: 128; DFAD: ``2 * ngf`` = 128); even.
        hidden_bn_eps: ``eps`` of the two hidden BatchNorms (DAFL's code: 0.8; DFAD's: 1e-5).

    ``forward(z)``: ``z`` of shape ``(B, latent_dim)`` (or ``(B, latent_dim, 1, 1)``, as DFAD's
    code passes it) -> images ``(B, channels, image_size, image_size)``.
    """

    def __init__(self, latent_dim: int = 100, image_size: int = 32, channels: int = 1, width: int = 128,
                 hidden_bn_eps: float = 1e-5) -> None:
        super().__init__()
        for name, value in (("latent_dim", latent_dim), ("image_size", image_size), ("channels", channels),
                            ("width", width)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"generator: {name} must be a positive int; got {value!r}")
        if image_size % 4:
            raise ValueError(f"generator: image_size must be a multiple of 4 (two x2 upsamplings); "
                             f"got {image_size}")
        if width % 2:
            raise ValueError(f"generator: width must be even (the last hidden conv has width/2 channels); "
                             f"got {width}")
        self.latent_dim, self.image_size, self.channels, self.width = latent_dim, image_size, channels, width
        self.init_size = image_size // 4
        self.project = nn.Linear(latent_dim, width * self.init_size ** 2)
        self.bn0 = nn.BatchNorm2d(width)
        self.block1 = nn.Sequential(nn.Conv2d(width, width, 3, padding=1), nn.BatchNorm2d(width, eps=hidden_bn_eps),
                                    nn.LeakyReLU(0.2))
        self.block2 = nn.Sequential(nn.Conv2d(width, width // 2, 3, padding=1),
                                    nn.BatchNorm2d(width // 2, eps=hidden_bn_eps), nn.LeakyReLU(0.2),
                                    nn.Conv2d(width // 2, channels, 3, padding=1), nn.Tanh(),
                                    nn.BatchNorm2d(channels, affine=False))

    def forward(self, z: Tensor) -> Tensor:
        z = z.reshape(z.shape[0], -1)
        if z.shape[1] != self.latent_dim:
            raise ValueError(f"generator expects z of shape (B, {self.latent_dim}); got {tuple(z.shape)}")
        out = self.project(z).view(z.shape[0], self.width, self.init_size, self.init_size)
        out = F.interpolate(self.bn0(out), scale_factor=2)
        out = F.interpolate(self.block1(out), scale_factor=2)
        return self.block2(out)


@register_model("dafl_generator")
def dafl_generator(latent_dim: int = 100, image_size: int = 32, channels: int = 1, width: int = 128) -> ConvGenerator:
    """DAFL's generator (arXiv 1904.01186; its code: hidden BNs with ``eps=0.8``; MNIST run at 32x32)."""
    return ConvGenerator(latent_dim, image_size, channels, width, hidden_bn_eps=0.8)


@register_model("dfad_generator")
def dfad_generator(latent_dim: int = 100, image_size: int = 32, channels: int = 1, width: int = 128) -> ConvGenerator:
    """DFAD's ``GeneratorA`` (arXiv 1912.11006; its code: ``nz=100, ngf=64`` so width 128, default BN eps)."""
    return ConvGenerator(latent_dim, image_size, channels, width, hidden_bn_eps=1e-5)
