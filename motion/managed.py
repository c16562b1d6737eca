"""This pack's own torch modules (motion predictor, IP-Adapter) under ComfyUI's model management.

A ModelPatcher owns each module, as core does for small plain-torch models (upscale models): ComfyUI counts its
weights, puts it on the torch device when it is used and offloads it under memory pressure. No node moves a
module that is a cached node output with ``.to()``.
"""
from __future__ import annotations

import torch


def module_patcher(module: torch.nn.Module):
    """``module`` wrapped in a ``comfy.model_patcher.ModelPatcher``: load device ComfyUI's torch device, offload
    device the UNet's (core's convention for small models such as upscalers). The module is not moved here."""
    import comfy.model_management as mm
    import comfy.model_patcher

    return comfy.model_patcher.ModelPatcher(module, load_device=mm.get_torch_device(),
                                            offload_device=mm.unet_offload_device())


def load(patcher) -> torch.device:
    """Load the whole module of ``patcher`` onto its load device through ``load_models_gpu`` and return that
    device. A full load: plain torch layers, unlike ComfyUI's ops, cannot be cast to the device per call."""
    import comfy.model_management as mm

    mm.load_models_gpu([patcher], force_full_load=True)
    return patcher.load_device
