"""Consistent Self-Attention on DiT models: the joint-attention adapter beside the UNet one (roles.py).

A DiT has no self-attention of its own: every block runs one attention over the joint sequence of the text
tokens, the image tokens and any appended reference (Kontext) tokens. ComfyUI calls
``transformer_options["optimized_attention_override"]`` for every attention call of the model, with
``block_type``/``block_index`` set by the model; :class:`JointAttention` is that override. It looks the model
call's context up (context.py, built once per call by patch.StoryAttention) and, in the patched blocks, lets the
IMAGE-token queries of image i attend to its own whole sequence plus the image tokens the call's plan samples
from the other images of its chunk (csa.joint_consistent_attention); text queries keep their own sequence.

Shared keys are taken after RoPE, with the positions of the image that owns them: every image of a batch has the
same position grid, so a token of image j at (y, x) acts for image i as if it sat at (y, x) of image i. Shared
tokens mostly influence the same region of the other panels (a locality prior that copies layout more than
UNet CSA, whose self-attention has no positions).

Families: Flux.1, Flux.2 and Chroma (double-stream blocks, then single-stream blocks over [txt, img]) and
Qwen-Image (joint blocks only, block_type "double", [txt, img] after RoPE, 5-D latents with one frame; current
ComfyUI masks padded text keys with a ``[rows, 1, N]`` mask, which csa.py reads as ComfyUI does). The text part
is the conditioning's token count, read by the APPLY_MODEL wrapper.

DiT image tokens sit at 1/16 of the image (VAE 8 x patch 2; Flux.2: VAE 16 x patch 1): their layers use the
node's 1/16 rate.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from ..errors import StoryDiffusionError, UnsupportedModelError
from .context import CONTEXT, NODE, Call
from .csa import joint_consistent_attention

FACTOR = 16  # image-level downsampling of every DiT image token
# The node's dit_blocks choices, by stage: "single" = the later blocks, "double" = the early ones.
DIT_BLOCK_CHOICES = {"single-stream": ("single",), "double-stream": ("double",), "all": ("double", "single")}


@dataclass(frozen=True)
class Family:
    """A DiT family CSA supports: ``name``; ``stages``: dit_blocks stage ("double": early, "single": later) ->
    ``((block_type, indices), ...)``, the blocks by ComfyUI's transformer_options["block_type"] and
    ["block_index"]; ``patch``: patch size (image tokens = ceil(H / patch) x ceil(W / patch) of the latent; the
    joint sequence is text, then image, then any appended reference tokens)."""

    name: str
    stages: dict
    patch: int

    def image_tokens(self, latent_hw: tuple) -> int:
        return math.ceil(latent_hw[0] / self.patch) * math.ceil(latent_hw[1] / self.patch)


SUPPORTED = "Flux.1 (dev, schnell), Flux.2, Chroma, Qwen-Image"


def dit_family(model_patcher, node: str = NODE) -> Family | None:
    """The :class:`Family` of a supported DiT, None for a model that is not a DiT (a UNet). Raises
    UnsupportedModelError naming ``node`` for DiTs and other transformers it does not support.

    Flux.1/Flux.2/Chroma: "double" = the double-stream blocks, "single" = the single-stream blocks. Qwen-Image has
    only joint blocks (block_type "double"): "double" = the earlier half, "single" = the later half (the middle
    block of an odd count counts as early), as Flux's later blocks and the reference app's UNet decoder."""
    import comfy.ldm.chroma.model as chroma
    import comfy.ldm.flux.model as flux
    import comfy.ldm.qwen_image.model as qwen_image

    net = model_patcher.get_model_object("diffusion_model")
    if hasattr(net, "input_blocks") or hasattr(net, "output_blocks"):
        return None
    if type(net) in (flux.Flux, chroma.Chroma):
        name = "Chroma" if type(net) is chroma.Chroma else "Flux.2" if len(net.params.axes_dim) == 4 else "Flux.1"
        return Family(name, {"double": (("double", range(len(net.double_blocks))),),
                             "single": (("single", range(len(net.single_blocks))),)}, net.patch_size)
    if type(net) is qwen_image.QwenImageTransformer2DModel:
        count = len(net.transformer_blocks)
        half = (count + 1) // 2
        return Family("Qwen-Image", {"double": (("double", range(half)),),
                                     "single": (("double", range(half, count)),)}, net.patch_size)
    raise UnsupportedModelError(f"{node}: input 'model': expected SD1.x, SD2.x, SDXL or one of the DiT families "
                                f"{SUPPORTED}, got {type(net).__name__}")


class JointLayer:
    """One patched DiT block's joint attention: ``key`` (block type, index, 0) keys the schedule's gates;
    ``factor``: 16; ``name``: "double.3". Immutable."""

    shares = True
    factor = FACTOR
    reader = None

    def __init__(self, block_type: str, index: int):
        self.key = (block_type, index, 0)
        self.name = f"{block_type}.{index}"


@dataclass(frozen=True, eq=False)
class JointAttention:
    """ComfyUI's ``optimized_attention_override`` of a patched DiT, ``override(func, q, k, v, heads, ...)``.

    ``layers``: ``{(block_type, index): JointLayer}``; ``previous``: an override that was on the model before,
    called instead of ``func`` (with the extended keys where CSA runs). Every other call (blocks not patched,
    calls that are not the model call's rows) passes through unchanged.
    """

    layers: dict
    previous: object = None

    def __deepcopy__(self, memo):
        return self

    def __call__(self, func, q, k, v, heads, *args, **kwargs):
        mask = args[0] if args else kwargs.pop("mask", None)
        args = args[1:]

        def attend(q, k, v, mask):
            if self.previous is not None:
                return self.previous(func, q, k, v, heads, *args, mask=mask, **kwargs)
            return func(q, k, v, heads, *args, mask=mask, **kwargs)

        options = kwargs.get("transformer_options") or {}
        layer = self.layers.get((options.get("block_type"), options.get("block_index")))
        if layer is None:
            return attend(q, k, v, mask)
        ctx: Call | None = options.get(CONTEXT)
        if ctx is None:
            raise StoryDiffusionError(f"{NODE}: DiT block {layer.name} was called outside the patched model's model "
                                      f"call (its context is missing): run the model through a ComfyUI sampler")
        level = ctx.level(layer)
        if level is None or q.ndim != 4 or q.shape[0] != ctx.rows:
            return attend(q, k, v, mask)
        span = (ctx.text, ctx.text + level.tokens)
        if q.shape[2] < span[1]:
            raise UnsupportedModelError(f"{NODE}: DiT block {layer.name} has {q.shape[2]} tokens where the call's "
                                        f"{ctx.text} text and {level.tokens} image tokens need {span[1]}: an unknown "
                                        f"layout")
        if level.order is not None:
            raise UnsupportedModelError(f"{NODE}: context windows with reference_count > 0 are not supported on DiT "
                                        f"models")
        token_dim = 2 if kwargs.get("skip_output_reshape") else 1
        return joint_consistent_attention(q, k, v, level.plan, span, attend, mask, token_dim)


def dit_layers(family: Family, stages: tuple) -> dict:
    """``{(block_type, index): JointLayer}`` for every block of ``stages`` ("double", "single") in ``family``."""
    return {(kind, i): JointLayer(kind, i) for stage in stages for kind, indices in family.stages[stage]
            for i in indices}


__all__ = ["DIT_BLOCK_CHOICES", "FACTOR", "Family", "JointAttention", "JointLayer", "SUPPORTED", "dit_family",
           "dit_layers"]
