"""Pixels to the run's shape: PIL modes to L or RGB, resize + centre crop, channel counts, flips.

Every image a run sees goes through here once (when decoded), so a folder, CIFAR-10 and a
resized MNIST come out the same way: uint8 (C, H, W) with C the run's channels.

How unusual images are converted (predictably, and the same on every machine):
- palette ("P", "PA") images: expanded to their colours through RGBA, then as RGBA below;
- images with alpha ("RGBA", "LA", "PA"): composited over black, as a PNG viewer on a dark page
  shows them (transparent pixels become black, not whatever colour they happened to store);
- 16- and 32-bit grayscale ("I;16", "I"): scaled to 8 bits by the top byte (value >> 8), so
  white stays white instead of clipping; floats ("F") in [0, 1] scale by 255;
- CMYK (JPEG) and YCbCr, LAB, HSV: PIL's conversion to RGB;
- colour to one channel: PIL's ITU-R 601-2 luma, L = (299 R + 587 G + 114 B) / 1000;
- one channel to colour: the gray value in all three channels.
Size: the shorter side is resized to the run's size (bilinear with antialiasing, torchvision's
transforms.v2), then the centre square is cut, as torchvision's ImageNet recipes do.
"""
from __future__ import annotations

import numpy as np
import torch
from PIL import Image
from torchvision.transforms import v2


def to_l_or_rgb(image: Image.Image) -> Image.Image:
    """Any PIL mode -> "L" or "RGB" as documented above (alpha over black, 16-bit by the top byte)."""
    mode = image.mode
    if mode in ("L", "RGB"):
        return image
    if mode == "1":
        return image.convert("L")
    if mode in ("P", "PA"):
        image = image.convert("RGBA")
        mode = "RGBA"
    if mode in ("RGBA", "LA", "RGBa", "La"):
        base = "RGB" if mode.startswith("RGB") else "L"
        canvas = Image.new(base, image.size, 0)
        canvas.paste(image.convert(base), mask=image.getchannel("A"))
        return canvas
    if mode.startswith("I;16") or mode == "I":
        values = np.asarray(image, dtype=np.int64)
        top = 65535 if mode.startswith("I;16") or values.max(initial=0) > 255 else 255
        scaled = values.clip(0, top) * 255 // top
        return Image.fromarray(scaled.astype(np.uint8), mode="L")
    if mode == "F":
        values = np.asarray(image, dtype=np.float64)
        return Image.fromarray((np.nan_to_num(values).clip(0, 1) * 255).round().astype(np.uint8), mode="L")
    return image.convert("RGB")  # CMYK, YCbCr, LAB, HSV


def to_channels(images: torch.Tensor, channels: int) -> torch.Tensor:
    """uint8 (N, C, H, W) with C 1 or 3 -> C = `channels` (luma, or the gray value repeated)."""
    have = images.shape[1]
    if have == channels:
        return images
    if channels == 3:
        return images.expand(-1, 3, -1, -1).contiguous()
    # PIL's fixed-point form of the same formula (Convert.c, L24), so a tensor converted here equals
    # the file converted by PIL, bit for bit
    rgb = images.to(torch.int64)
    luma = (rgb[:, 0:1] * 19595 + rgb[:, 1:2] * 38470 + rgb[:, 2:3] * 7471 + 0x8000) >> 16
    return luma.to(torch.uint8)


def resize_crop(images: torch.Tensor, size: int) -> torch.Tensor:
    """uint8 (N, C, H, W) -> (N, C, size, size): shorter side to `size`, then the centre square."""
    if images.shape[-2:] == (size, size):
        return images  # already the run's size: the exact pixels, no resampling
    pipeline = v2.Compose([v2.Resize(size, antialias=True), v2.CenterCrop(size)])
    return pipeline(images)


def conform(images: torch.Tensor, size: int, channels: int) -> torch.Tensor:
    """uint8 (N, C, H, W) of any size and C in (1, 3) -> the run's (N, channels, size, size)."""
    return resize_crop(to_channels(images, channels), size).contiguous()


def random_hflip(x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Mirror each image of a batch (B, C, H, W) left-right with probability 1/2 (--hflip)."""
    flip = torch.rand(x.shape[0], generator=generator, device="cpu") < 0.5
    flip = flip.to(x.device).view(-1, 1, 1, 1)
    return torch.where(flip, x.flip(-1), x)
