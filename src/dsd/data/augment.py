"""Batch augmentation on the training tensors, on whatever device they live on.

`draw` and `apply` are `crop_flip` in two steps, so that ranks can draw one global batch's
offsets and each apply its own share of them: the augmentation of an example then does not
depend on the number of ranks.
"""

import torch


def draw(generator: torch.Generator, batch: int, padding: int):
    """Per example, on CPU: crop offsets dy, dx in 0..2*padding and whether to flip."""
    if padding < 0:
        raise ValueError(f"padding must be at least 0, got {padding}")
    dy = torch.randint(0, 2 * padding + 1, (batch,), generator=generator)
    dx = torch.randint(0, 2 * padding + 1, (batch,), generator=generator)
    flip = torch.randint(0, 2, (batch,), generator=generator).bool()
    return dy, dx, flip


def apply(x: torch.Tensor, offsets, *, padding: int, fill) -> torch.Tensor:
    """Crop (B, C, H, W) at `offsets` (dy, dx, flip from `draw`, one each per example) out of
    x padded by `padding` with `fill` per channel, and flip where drawn: one gather."""
    if x.dim() != 4:
        raise ValueError(f"x must be a batch (B, C, H, W), got shape {tuple(x.shape)}")
    if padding < 0:
        raise ValueError(f"padding must be at least 0, got {padding}")
    b, c, h, w = x.shape
    fill = torch.as_tensor(fill, dtype=x.dtype, device=x.device)
    if fill.shape != (c,):
        raise ValueError(f"fill has shape {tuple(fill.shape)}; give one value per channel ({c})")
    dy, dx, flip = (t.to(x.device) for t in offsets)
    if not len(dy) == len(dx) == len(flip) == b:
        raise ValueError(f"offsets are for {len(dy)}, {len(dx)}, {len(flip)} examples; x has {b}")
    # Channels last, so one gather along the pixel axis moves every channel of a pixel at once.
    hp, wp = h + 2 * padding, w + 2 * padding
    padded = fill.repeat(b, hp, wp, 1)
    padded[:, padding:padding + h, padding:padding + w] = x.permute(0, 2, 3, 1)
    rows = dy[:, None] + torch.arange(h, device=x.device)
    cols = torch.arange(w, device=x.device).expand(b, w)
    cols = dx[:, None] + torch.where(flip[:, None], w - 1 - cols, cols)
    index = (rows[:, :, None] * wp + cols[:, None, :]).reshape(b, h * w, 1).expand(b, h * w, c)
    out = padded.reshape(b, hp * wp, c).gather(1, index).reshape(b, h, w, c).permute(0, 3, 1, 2)
    # The result is channels_last in memory; hand back the layout the caller gave.
    if x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
        return out
    return out.contiguous()


def crop_flip(x: torch.Tensor, generator: torch.Generator, *, padding: int = 4,
              fill) -> torch.Tensor:
    """Random crop with `padding` and random horizontal flip of a batch (B, C, H, W),
    vectorised (one gather, no Python loop over examples); padding takes `fill` per channel.

    Draws all its randomness from `generator` (a CPU generator; x may be on any device: the
    offsets are drawn on CPU and moved), so a batch's augmentation depends only on the
    generator's state, never on the device.
    """
    return apply(x, draw(generator, len(x), padding), padding=padding, fill=fill)
