"""Character regions for subject-masked CSA (issue 10): from soft character masks to who attends to whom.

Pure torch. Soft masks ``(images, characters, h, w)`` in [0, 1] (attention-derived, masks.py, or given by the
user) become, at each resolution level where CSA acts, a :class:`~.csa.Routing`:

* membership: token t of image j is in character c's region when the mask, resized to the level (bilinear,
  ``align_corners=False``), exceeds ``threshold`` there and j's panel names c;
* slots: the characters image i's panel names, in story order (``-1`` pads);
* the slot each query reads: every query of a one-character panel reads its character (ConsiStory's subject-
  masked sharing: the whole image sees the other images' subject tokens, Tewel et al., arXiv 2402.03286); a
  query of a panel naming several characters reads the character whose region holds it (the highest mask value
  when regions overlap) and a query in no region reads none (its own image only: the background of a
  multi-character panel is its own); a ``[NC]`` panel reads nothing from the others.

Smoothing (:func:`smooth`) and normalisation (:func:`normalise`) are shared with the masks' node output.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .csa import Routing

MASK_RUN = "sdn_character_masks"  # transformer_options key of the sampling run's masks.MaskRun
_BINOMIAL = (0.25, 0.5, 0.25)


def smooth(maps: torch.Tensor) -> torch.Tensor:
    """A 3x3 binomial blur (``[1, 2, 1] / 4`` along each axis, edges replicated) of every map of ``(..., h, w)``:
    removes the single-token speckle of attention maps before they are normalised and thresholded."""
    shape = maps.shape
    x = maps.reshape(-1, 1, *shape[-2:]).float()
    k = torch.tensor(_BINOMIAL, device=x.device)
    x = F.conv2d(F.pad(x, (1, 1, 0, 0), mode="replicate"), k.view(1, 1, 1, 3))
    x = F.conv2d(F.pad(x, (0, 0, 1, 1), mode="replicate"), k.view(1, 1, 3, 1))
    return x.reshape(shape)


def normalise(maps: torch.Tensor) -> torch.Tensor:
    """Min-max normalisation of every map of ``(..., h, w)`` to [0, 1]; a constant map becomes all zeros."""
    lo = maps.amin((-2, -1), keepdim=True)
    span = maps.amax((-2, -1), keepdim=True) - lo
    return torch.where(span > 0, (maps - lo) / span.clamp_min(torch.finfo(maps.dtype).tiny), torch.zeros_like(maps))


def level_hw(latent_hw: tuple, factor: int) -> tuple[int, int]:
    """Height and width of a UNet layer at image-level downsampling ``factor`` (8 = the latent): every stride-2
    convolution rounds odd sizes up."""
    h, w = latent_hw
    for _ in range(factor.bit_length() - 4):
        h, w = -(-h // 2), -(-w // 2)
    return h, w


def routing(soft: torch.Tensor, named: tuple, hw: tuple, threshold: float) -> Routing:
    """The :class:`~.csa.Routing` of ``images`` at a level of ``hw`` = (height, width) tokens (row-major).

    soft: float ``(images, characters, h, w)`` in [0, 1], any h, w, on the compute device. named: per image, the
    character columns its panel names (in order). threshold: region membership is ``mask > threshold``.
    Everything stays on soft's device; nothing is read back.
    """
    images, chars = soft.shape[:2]
    maps = soft.float()
    if tuple(maps.shape[-2:]) != tuple(hw):
        maps = F.interpolate(maps, size=tuple(hw), mode="bilinear", align_corners=False)
    names = torch.zeros(images, chars, dtype=torch.bool)
    for i, cols in enumerate(named):
        names[i, list(cols)] = True
    maps = maps * names.to(maps.device)[..., None, None]
    maps = maps.flatten(2).transpose(1, 2)  # (images, N, characters)
    member = maps > threshold
    k = max(1, max(len(cols) for cols in named))
    slots = torch.full((images, k), -1, dtype=torch.long)
    for i, cols in enumerate(named):
        slots[i, :len(cols)] = torch.tensor(cols, dtype=torch.long)
    slots = slots.to(soft.device)
    n = maps.shape[1]
    # slot scores: the mask value of each slot's character where the query is in its region, else -1
    score = torch.where(member.gather(2, slots.clamp_min(0)[:, None].expand(-1, n, -1)) & (slots >= 0)[:, None],
                        maps.gather(2, slots.clamp_min(0)[:, None].expand(-1, n, -1)), torch.full((), -1.0,
                                                                                                 device=soft.device))
    best, slot = score.max(-1)
    several = torch.tensor([len(cols) > 1 for cols in named], device=soft.device)[:, None]
    query_slot = torch.where(several, torch.where(best >= 0, slot, torch.full_like(slot, -1)), torch.zeros_like(slot))
    return Routing(member.reshape(images * n, chars), slots, query_slot)


__all__ = ["MASK_RUN", "smooth", "normalise", "routing", "level_hw"]
