"""Full-reference image metrics for translation and super-resolution: L1, PSNR, SSIM, and a
no-reference sharpness figure. Inputs are [N, C, H, W] in [-1, 1]; metrics are computed on the
[0, 1] scale, per image, then averaged (how papers report them).

SSIM follows Wang et al. 2004: 11x11 Gaussian window (σ = 1.5), K1 = 0.01, K2 = 0.03, computed per
channel over the valid window positions and averaged — the same choices as scikit-image's
`structural_similarity(gaussian_weights=True, use_sample_covariance=False)`, which the tests
compare against.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def to_unit(images: torch.Tensor) -> torch.Tensor:
    return ((images.double().clamp(-1, 1) + 1) / 2)


def shave(images: torch.Tensor, border: int) -> torch.Tensor:
    """Drop `border` px on each side (SR papers shave the scale factor: borders are guesswork)."""
    return images[..., border:-border, border:-border] if border > 0 else images


def l1(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((to_unit(a) - to_unit(b)).abs().mean())


def psnr_per_image(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    mse = (to_unit(a) - to_unit(b)).pow(2).flatten(1).mean(dim=1)
    return 10 * torch.log10(1.0 / mse.clamp_min(1e-12))


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(psnr_per_image(a, b).mean())


def gaussian_window(size: int = 11, sigma: float = 1.5) -> torch.Tensor:
    coords = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-coords**2 / (2 * sigma**2))
    g = g / g.sum()
    return g[:, None] * g[None, :]


def ssim_per_image(a: torch.Tensor, b: torch.Tensor, window: int = 11, sigma: float = 1.5) -> torch.Tensor:
    x, y = to_unit(a), to_unit(b)
    channels = x.shape[1]
    if min(x.shape[-2:]) < window:
        raise ValueError(f"SSIM needs images of at least {window}x{window} px, got {tuple(x.shape[-2:])}")
    kernel = gaussian_window(window, sigma).to(x)[None, None].expand(channels, 1, -1, -1)

    def blur(t: torch.Tensor) -> torch.Tensor:
        return F.conv2d(t, kernel, groups=channels)

    c1, c2 = 0.01**2, 0.03**2
    mx, my = blur(x), blur(y)
    vx, vy, cxy = blur(x * x) - mx**2, blur(y * y) - my**2, blur(x * y) - mx * my
    ssim_map = ((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx**2 + my**2 + c1) * (vx + vy + c2))
    return ssim_map.flatten(1).mean(dim=1)


def ssim(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(ssim_per_image(a, b).mean())


def sharpness(images: torch.Tensor) -> float:
    """Mean gradient magnitude of the luma (finite differences, [0, 1] scale): higher is sharper.
    Reported beside PSNR for SR, where a GAN trades a little PSNR for much crisper detail."""
    unit = to_unit(images)
    luma = unit.mean(dim=1) if unit.shape[1] != 3 else 0.299 * unit[:, 0] + 0.587 * unit[:, 1] + 0.114 * unit[:, 2]
    dx, dy = luma[:, :, 1:] - luma[:, :, :-1], luma[:, 1:, :] - luma[:, :-1, :]
    return float((dx[:, :-1].pow(2) + dy[:, :, :-1].pow(2)).sqrt().mean())


def full_reference(output: torch.Tensor, target: torch.Tensor, border: int = 0) -> dict[str, float]:
    """L1, PSNR, SSIM of `output` against `target` (after shaving `border` px)."""
    out, tgt = shave(output, border), shave(target, border)
    return {"l1": l1(out, tgt), "psnr": psnr(out, tgt), "ssim": ssim(out, tgt)}
