"""IP-Adapter checkpoints and per-frame decoupled cross-attention on ComfyUI's UNet.

Follows IP-Adapter (Ye et al., arXiv 2308.06721; checkpoints of github tencent-ailab/IP-Adapter): image
tokens get their own key/value projections and their attention output is added to the text attention,
``out = attn(q, K_text, V_text) + weight * attn(q, to_k_ip(img), to_v_ip(img))`` (the same query, the
same heads), before the layer's output projection. StoryDiffusion's SMP decodes predicted per-frame
embeddings this way (arXiv 2405.01434, Sec. 3.2: each frame attends over text tokens and its own image
tokens).

Checkpoint layout (``.bin``: ``{"image_proj": {...}, "ip_adapter": {...}}``; ``.safetensors``: the same
keys flattened as ``image_proj.<k>`` / ``ip_adapter.<k>``):

* plain (``ip-adapter_sd15``): ``image_proj.proj.{weight,bias}`` Linear(1024 -> 4 * 768) and
  ``image_proj.norm.{weight,bias}`` LayerNorm(768): 4 tokens from CLIP ``image_embeds`` (1024).
* plus (``ip-adapter-plus_sd15``): a perceiver resampler: ``latents`` (1, 16, 768), ``proj_in``
  Linear(1280 -> 768), ``layers.<i>.0.{norm1,norm2}`` LayerNorms, ``layers.<i>.0.to_q`` (768 -> 768,
  no bias), ``layers.<i>.0.to_kv`` (768 -> 1536, no bias), ``layers.<i>.0.to_out`` (768 -> 768, no
  bias), feed-forward ``layers.<i>.1.0`` LayerNorm, ``.1.1`` Linear(768 -> 3072, no bias), GELU,
  ``.1.3`` Linear(3072 -> 768, no bias); ``proj_out`` Linear(768 -> 768), ``norm_out`` LayerNorm(768);
  depth 4, 64-dim heads: 16 tokens from the CLIP vision penultimate hidden states (257 x 1280).
* ``ip_adapter.<n>.to_k_ip.weight`` / ``to_v_ip.weight`` (inner x 768, no bias) for n = 1, 3, ..., 31:
  diffusers numbers every attention processor (self, cross, self, cross, ...) in the order down blocks,
  up blocks, mid block, and only cross-attention processors (odd n) carry weights. In ComfyUI terms that
  is input blocks 1, 2, 4, 5, 7, 8, then output blocks 3..11, then the middle block (the per-processor
  channel list 320x4, 640x4, 1280x4, 1280x6, 640x6, 320x6, 1280x2 confirms it), which is the order
  :func:`cross_attention_blocks` enumerates.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

import torch
from torch import nn

from .managed import module_patcher

NODE_APPLY = "SDN_ApplyTransitionEmbeds"
NODE_LOAD = "SDN_IPAdapterLoader"


# ----------------------------------------------------------------------------------------------------
# image projection models (module names match the checkpoint keys)

class PlainImageProj(nn.Module):
    """CLIP image_embeds (B, D_clip) -> (B, tokens, D_cross): Linear then LayerNorm per token."""

    def __init__(self, clip_dim: int, cross_dim: int, tokens: int):
        super().__init__()
        self.tokens, self.cross_dim = tokens, cross_dim
        self.proj = nn.Linear(clip_dim, tokens * cross_dim)
        self.norm = nn.LayerNorm(cross_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim == 3:  # (B, 1, D) is accepted as (B, D)
            x = x[:, 0]
        return self.norm(self.proj(x).reshape(x.shape[0], self.tokens, self.cross_dim))


class _PerceiverAttention(nn.Module):
    def __init__(self, dim: int, inner: int, dim_head: int):
        super().__init__()
        self.heads = inner // dim_head
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_kv = nn.Linear(dim, inner * 2, bias=False)
        self.to_out = nn.Linear(inner, dim, bias=False)

    def forward(self, x, latents):
        x, latents = self.norm1(x), self.norm2(latents)
        # queries: the latents; keys/values: image features and the latents themselves
        q = self.to_q(latents)
        k, v = self.to_kv(torch.cat([x, latents], dim=1)).chunk(2, dim=-1)
        b = latents.shape[0]

        def heads(t):
            return t.reshape(b, t.shape[1], self.heads, -1).transpose(1, 2)

        o = torch.nn.functional.scaled_dot_product_attention(heads(q), heads(k), heads(v))
        return self.to_out(o.transpose(1, 2).reshape(b, latents.shape[1], -1))


class ResamplerImageProj(nn.Module):
    """CLIP hidden states (B, N, D_clip) -> (B, queries, D_out) with a perceiver resampler."""

    def __init__(self, clip_dim: int, dim: int, out_dim: int, queries: int, depth: int, inner: int,
                 ff_inner: int, dim_head: int = 64):
        super().__init__()
        self.latents = nn.Parameter(torch.zeros(1, queries, dim))
        self.proj_in = nn.Linear(clip_dim, dim)
        self.proj_out = nn.Linear(dim, out_dim)
        self.norm_out = nn.LayerNorm(out_dim)
        self.layers = nn.ModuleList(
            nn.ModuleList([
                _PerceiverAttention(dim, inner, dim_head),
                nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, ff_inner, bias=False), nn.GELU(),
                              nn.Linear(ff_inner, dim, bias=False)),
            ]) for _ in range(depth))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.proj_in(x)
        lat = self.latents.expand(x.shape[0], -1, -1)
        for attn, ff in self.layers:
            lat = attn(x, lat) + lat
            lat = ff(lat) + lat
        return self.norm_out(self.proj_out(lat))


# ----------------------------------------------------------------------------------------------------
# checkpoint parsing

class IPAdapterWeights(nn.Module):
    """Every weight of an IP-Adapter in one module, the one its ModelPatcher manages: ``image_proj`` and, per
    cross-attention layer i in checkpoint order, ``to_k_ip[i]`` / ``to_v_ip[i]`` (Linear cross_dim -> inner,
    no bias)."""

    def __init__(self, image_proj: nn.Module, inner_dims: list[int], cross_dim: int):
        super().__init__()
        self.image_proj = image_proj
        self.to_k_ip = nn.ModuleList(nn.Linear(cross_dim, n, bias=False) for n in inner_dims)
        self.to_v_ip = nn.ModuleList(nn.Linear(cross_dim, n, bias=False) for n in inner_dims)


@dataclass
class IPAdapterModel:
    """A parsed IP-Adapter (the ``SDN_IPADAPTER`` payload): ``kind`` "plain" | "plus", ``patcher`` (a ModelPatcher
    of its :class:`IPAdapterWeights`, eval, float32: ComfyUI's model management loads it), ``clip_dim`` (input
    width: 1024 plain / 1280 plus for ViT-H), ``cross_dim`` (768 for SD1.5), ``tokens`` (image tokens per frame:
    4 plain / 16 plus)."""
    kind: str
    patcher: object
    clip_dim: int
    cross_dim: int
    tokens: int

    @property
    def image_proj(self) -> nn.Module:
        return self.patcher.model.image_proj

    @property
    def layers(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """``(to_k_ip weight, to_v_ip weight)`` per cross-attention layer in checkpoint order, each
        (inner, cross_dim)."""
        w = self.patcher.model
        return [(k.weight, v.weight) for k, v in zip(w.to_k_ip, w.to_v_ip)]

    @property
    def embeds_kind(self) -> str:
        return "penultimate_hidden_states" if self.kind == "plus" else "image_embeds"

    def __repr__(self):
        return (f"IPAdapterModel(kind={self.kind}, tokens={self.tokens}, clip_dim={self.clip_dim}, "
                f"cross_dim={self.cross_dim}, layers={len(self.layers)})")


def split_state_dict(sd: dict) -> tuple[dict, dict]:
    """Return ``(image_proj, ip_adapter)`` sub-dicts of a nested (.bin) or flat (.safetensors) state dict."""
    if isinstance(sd.get("image_proj"), dict):
        ip = sd.get("ip_adapter")
        return dict(sd["image_proj"]), dict(ip) if isinstance(ip, dict) else {}
    proj, ip = {}, {}
    for k, v in sd.items():
        if not isinstance(k, str):
            continue
        if k.startswith("image_proj."):
            proj[k[len("image_proj."):]] = v
        elif k.startswith("ip_adapter."):
            ip[k[len("ip_adapter."):]] = v
    return proj, ip


# the tensors each image projection's size is read from, with their number of dimensions
_PLUS_SIZES = {"latents": 3, "proj_in.weight": 2, "proj_out.weight": 2, "layers.0.0.to_q.weight": 2,
               "layers.0.1.1.weight": 2}
_PLAIN_SIZES = {"proj.weight": 2, "norm.weight": 1}


def load_ip_adapter(path: str, source: str) -> IPAdapterModel:
    """Read an IP-Adapter checkpoint (.safetensors, or .bin through ComfyUI's weights-only ``torch.load``) and
    parse it. Raises NodeInputError (node SDN_IPAdapterLoader, input ``ipadapter_name``, naming ``source``) for
    an unreadable file and for everything :func:`parse_state_dict` refuses."""
    import comfy.utils

    from ..errors import NodeInputError

    try:
        sd = comfy.utils.load_torch_file(path, safe_load=True)
    except Exception as e:  # safetensors, zipfile and the unpickler each raise their own types
        first = (str(e).splitlines() or [""])[0][:200]
        raise NodeInputError(NODE_LOAD, "ipadapter_name", "a readable IP-Adapter checkpoint (.safetensors or .bin)",
                             got=f"{source}: {type(e).__name__}: {first}") from e
    return parse_state_dict(sd, source)


def parse_state_dict(sd: dict, source: str = "ipadapter") -> IPAdapterModel:
    """Build an :class:`IPAdapterModel` from a checkpoint state dict; detects plain vs plus by keys.

    The adapter's module (:class:`IPAdapterWeights`) is built on the ``meta`` device from the sizes of a few
    tensors and compared with every tensor of the file before it takes the file's weights, so a file cannot make
    it allocate more than it holds (tensor names claiming many resampler layers, say); it is handed to a
    ModelPatcher (:func:`motion.managed.module_patcher`), not moved. Raises NodeInputError (node
    SDN_IPAdapterLoader, input ``ipadapter_name``, naming ``source``) for: not a dict of floating-point
    tensors, an unknown image projection (FaceID, "full" MLP, ...), missing/odd ip layers, inconsistent shapes.
    """
    from ..errors import NodeInputError

    def bad(expected, got):
        return NodeInputError(NODE_LOAD, "ipadapter_name", expected, got=f"{source}: {got}")

    if not isinstance(sd, dict):
        raise bad("a state dict (tensors by name)", type(sd).__name__)
    proj, ip = split_state_dict(sd)
    if not proj or not ip:
        raise bad("an IP-Adapter checkpoint with 'image_proj' and 'ip_adapter' weights",
                  f"top-level keys {sorted({str(k).split('.')[0] for k in sd})[:8]}")
    odd = [k for part in (proj, ip) for k, v in part.items()
           if not (isinstance(k, str) and isinstance(v, torch.Tensor) and torch.is_floating_point(v))]
    if odd:
        raise bad("floating-point tensors", f"{sorted(map(str, odd))[:4]} are not")
    proj = {k: v.float() for k, v in proj.items()}

    def sizes(layout, kind):
        for key, ndim in layout.items():
            if key not in proj:
                raise bad(f"the {kind} image projection's '{key}'", "missing")
            if proj[key].ndim != ndim:
                raise bad(f"a {ndim}-D '{key}'", f"shape {tuple(proj[key].shape)}")

    if "latents" in proj and "proj_in.weight" in proj:
        sizes(_PLUS_SIZES, "plus")
        depth = len({m.group(1) for k in proj if (m := re.match(r"layers\.(\d+)\.", k))})
        _, queries, dim = proj["latents"].shape
        clip_dim = proj["proj_in.weight"].shape[1]
        out_dim = proj["proj_out.weight"].shape[0]
        inner = proj["layers.0.0.to_q.weight"].shape[0]
        ff_inner = proj["layers.0.1.1.weight"].shape[0]
        if inner % 64:
            raise bad("perceiver attention widths that are multiples of 64 (IP-Adapter plus)", f"{inner}")
        with torch.device("meta"):
            image_proj = ResamplerImageProj(clip_dim, dim, out_dim, queries, depth, inner, ff_inner)
        kind, cross_dim, tokens = "plus", out_dim, queries
    elif set(proj) == {"proj.weight", "proj.bias", "norm.weight", "norm.bias"}:
        sizes(_PLAIN_SIZES, "plain")
        cross_dim = proj["norm.weight"].shape[0]
        total, clip_dim = proj["proj.weight"].shape
        if total % cross_dim:
            raise bad("proj rows = tokens x norm width", f"{total} rows, norm {cross_dim}")
        with torch.device("meta"):
            image_proj = PlainImageProj(clip_dim, cross_dim, total // cross_dim)
        kind, tokens = "plain", total // cross_dim
    else:
        raise bad("plain ('proj', 'norm') or plus ('latents', 'proj_in', 'layers', ...) image_proj keys "
                  "(FaceID and MLP-projection variants are not supported)", f"keys {sorted(proj)[:6]}")
    expected = {k: tuple(v.shape) for k, v in image_proj.state_dict().items()}
    missing, unexpected = sorted(set(expected) - set(proj)), sorted(set(proj) - set(expected))
    wrong = [f"{k} {tuple(proj[k].shape)} (expected {s})" for k, s in expected.items()
             if k in proj and tuple(proj[k].shape) != s]
    if missing or unexpected or wrong:
        raise bad(f"image_proj weights of the detected {kind} layout",
                  f"missing {missing[:4]}, unexpected {unexpected[:4]}, shapes {wrong[:4]}")

    numbers = sorted({int(k.split(".")[0]) for k in ip if k.split(".")[0].isdecimal()})
    weights = {f"image_proj.{k}": v for k, v in proj.items()}
    inner_dims = []
    for i, n in enumerate(numbers):
        kk, vk = f"{n}.to_k_ip.weight", f"{n}.to_v_ip.weight"
        if kk not in ip or vk not in ip:
            raise bad(f"'{kk}' and '{vk}'", "one of them missing")
        k_w, v_w = ip[kk].float(), ip[vk].float()
        if k_w.shape != v_w.shape or k_w.ndim != 2 or k_w.shape[1] != cross_dim:
            raise bad(f"to_k_ip/to_v_ip of shape (inner, {cross_dim})", f"{tuple(k_w.shape)}, {tuple(v_w.shape)}")
        weights[f"to_k_ip.{i}.weight"], weights[f"to_v_ip.{i}.weight"] = k_w, v_w
        inner_dims.append(k_w.shape[0])
    if numbers != list(range(1, 2 * len(numbers), 2)):
        raise bad("ip layers numbered 1, 3, 5, ... (one per cross-attention)", f"{numbers[:6]}...")
    with torch.device("meta"):
        module = IPAdapterWeights(image_proj, inner_dims, cross_dim)
    module.load_state_dict(weights, assign=True)
    module.eval().requires_grad_(False)
    return IPAdapterModel(kind, module_patcher(module), clip_dim, cross_dim, tokens)


def cross_attention_blocks(model_patcher) -> list[tuple[tuple[str, int, int], nn.Module]]:
    """``[((block_name, number, depth_index), attn2 module), ...]`` in IP-Adapter checkpoint order:
    input blocks, then output blocks, then the middle block (diffusers: down, up, mid).

    Raises UnsupportedModelError for models that are not image UNets: DiTs, and video UNets with temporal
    layers (Stable Video Diffusion: its spatial blocks look like SD's, but no IP-Adapter was made for them)."""
    from ..attention.patch import is_video_unet
    from ..errors import UnsupportedModelError

    dm = model_patcher.model.diffusion_model
    expected = f"{NODE_APPLY}: input 'model': expected an image UNet (SD1.x/SD2.x/SDXL), got {type(dm).__name__}"
    if not all(hasattr(dm, a) for a in ("input_blocks", "output_blocks", "middle_block")):
        raise UnsupportedModelError(expected)
    if is_video_unet(dm):
        raise UnsupportedModelError(f"{expected} with temporal layers (a video model such as Stable Video Diffusion)")
    out = []
    for name, blocks in (("input", list(dm.input_blocks)), ("output", list(dm.output_blocks)),
                         ("middle", [dm.middle_block])):
        for number, blk in enumerate(blocks):
            for layer in blk:
                for depth, tb in enumerate(getattr(layer, "transformer_blocks", [])):
                    if getattr(tb, "attn2", None) is not None:
                        out.append(((name, number, depth), tb.attn2))
    return out


# ----------------------------------------------------------------------------------------------------
# per-frame routing

def frame_indices(extra_options: dict, batch: int, total: int) -> list[int]:
    """Frame index (into the full video) of each of the ``batch`` latents of this model call.

    Under a context window (AnimateDiff-Evolved or core, with or without its causal anchor frame) the window's
    frames (:func:`attention.frames.window_frames`); otherwise the batch is the whole video. Raises
    NodeInputError when the ``total`` embeds do not cover the video, FrameLayoutError for an unknown window
    layout.
    """
    from ..attention.frames import video_length, window_frames
    from ..errors import NodeInputError

    full = video_length(extra_options)
    idx = window_frames(extra_options, batch, NODE_APPLY)
    if idx is None:
        idx = list(range(batch))
        full = batch if full is None else full
    if full is not None and full != total:
        raise NodeInputError(NODE_APPLY, "embeds", f"one embedding per frame ({full} latent frames)",
                             got=f"{total} frames of embeds")
    if max(idx) >= total:
        raise NodeInputError(NODE_APPLY, "embeds", f"embeds covering frame {max(idx)} of the context window",
                             got=f"{total} frames of embeds")
    return idx


CONTEXT = "sdn_ip_adapter"  # transformer_options key of the model call's AdapterCall; key of its APPLY_MODEL wrapper


@dataclass(frozen=True)
class AdapterCall:
    """What the IP-Adapter patches of one model call look up (:func:`describe_call`).

    ``chunks``: cond_or_uncond (row = chunk * images + image; chunk 1 is negative); ``sigma``: the call's sigma
    (a float), None when no adapter of the model has a sigma range; ``frames[n]``: for embeds of n frames, the
    embedding each image of a chunk reads, int64 ``(images,)`` on the compute device.
    """

    chunks: tuple
    sigma: float | None
    frames: dict

    def active(self, sigma_range) -> bool:
        """Whether an adapter with ``sigma_range`` (high, low), or None (always), acts in this call."""
        if sigma_range is None or self.sigma is None:
            return True
        hi, lo = sigma_range
        return lo <= self.sigma <= hi


def describe_call(options: dict, rows: int, lengths, sigma: float | None, device) -> AdapterCall:
    """The :class:`AdapterCall` of a model call of ``rows`` latent rows: its transformer_options ``options``, the
    embeds lengths of the model's adapters ``lengths`` (1: one embedding for every frame), ``sigma`` (already read
    from the device, or None), ``device``: the compute device. The index tensors are copied to it without waiting.
    Raises NodeInputError / FrameLayoutError as :func:`frame_indices`, RuntimeError when the rows do not split into
    the call's cond/uncond chunks."""
    chunks = tuple(int(c) for c in options.get("cond_or_uncond") or (0,))
    if rows % len(chunks):
        raise RuntimeError(f"{NODE_APPLY}: {rows} rows do not split into {len(chunks)} cond/uncond chunks")
    images = rows // len(chunks)
    frames = {n: torch.tensor([0] * images if n == 1 else frame_indices(options, images, n))
              .to(device, non_blocking=True) for n in lengths}
    return AdapterCall(chunks, sigma, frames)


@dataclass(frozen=True, eq=False)
class AdapterCalls:
    """APPLY_MODEL wrapper of an IP-Adapter-patched model, one however many adapters are chained: builds the call's
    :class:`AdapterCall` once (one host read of the sigma when ``gated``: some adapter has a sigma range) and hands
    it to the attn2 patches in transformer_options, so they never read the device. ``lengths``: the embeds
    lengths of the model's adapters."""

    lengths: frozenset
    gated: bool

    def __deepcopy__(self, memo):
        return self

    def __call__(self, executor, x, t, c_concat=None, c_crossattn=None, control=None, transformer_options=None,
                 **kwargs):
        options = transformer_options or {}
        call = describe_call(options, x.shape[0], self.lengths, float(t.max()) if self.gated else None, x.device)
        return executor(x, t, c_concat, c_crossattn, control, {**options, CONTEXT: call}, **kwargs)


class IPAdapterAttn2:
    """One ``attn2`` replace patch: decoupled cross-attention with per-frame image tokens.

    ``adapter``: the IP-Adapter's ModelPatcher (:attr:`IPAdapterModel.patcher`), ``layer``: this block's index
    into its ``to_k_ip``/``to_v_ip``; ``pos``/``neg``: projected image tokens (F, T, D_cross) for positive /
    negative chunks. ``sigma_range`` (high, low): active when low <= sigma <= high. The model call's
    :class:`AdapterCall` (made by the model's :class:`AdapterCalls` wrapper) says which frames its rows are and
    whether the sigma is in range; StoryDiffusionError when it is missing (the UNet called without apply_model's
    wrappers). ``models()`` names the adapter (and a chained patch's models) so ComfyUI loads its weights
    together with the UNet; ``to(device or dtype)`` returns a moved copy (ComfyUI calls it on the patcher it
    loads), ``deepcopy`` returns self (see comfy-host pitfall 8: ModelPatcher.clone deep-copies model_options).
    """

    def __init__(self, adapter, layer: int, pos, neg, weight: float, sigma_range=None, base=None):
        self.adapter, self.layer, self.pos, self.neg = adapter, layer, pos, neg
        self.weight = float(weight)
        self.sigma_range = sigma_range
        self.base = base  # an attn2 replace patch that was there before (e.g. another adapter): chained

    def __deepcopy__(self, memo):
        return self

    def to(self, device_or_dtype):
        base = self.base.to(device_or_dtype) if hasattr(self.base, "to") else self.base
        return IPAdapterAttn2(self.adapter, self.layer, self.pos.to(device_or_dtype), self.neg.to(device_or_dtype),
                              self.weight, self.sigma_range, base)

    def models(self) -> list:
        return [self.adapter, *(self.base.models() if hasattr(self.base, "models") else [])]

    def __call__(self, q, k, v, extra_options):
        from comfy.ldm.modules.attention import optimized_attention

        from ..errors import StoryDiffusionError

        heads = extra_options["n_heads"]
        prec = extra_options.get("attn_precision")
        if self.base is not None:
            out = self.base(q, k, v, extra_options)
        else:
            out = optimized_attention(q, k, v, heads, attn_precision=prec)
        if self.weight == 0.0:
            return out
        call = extra_options.get(CONTEXT)
        if call is None:
            raise StoryDiffusionError(f"{NODE_APPLY}: a cross-attention layer was called outside the patched model's "
                                      f"model call (its context is missing): run the model through a ComfyUI sampler")
        if not call.active(self.sigma_range):
            return out
        idx = call.frames[self.pos.shape[0]]
        pos, neg = (t.to(idx.device).index_select(0, idx) for t in (self.pos, self.neg))
        # row = chunk * images + image; negative chunks (1) take the negative image tokens
        img = torch.cat([neg if c == 1 else pos for c in call.chunks], dim=0).to(q.device, q.dtype)
        weights = self.adapter.model
        # loaded with the UNet (models()); cast per call like ComfyUI's manual_cast ops (a no-op once in place)
        ik = img @ weights.to_k_ip[self.layer].weight.to(q.device, q.dtype).t()
        iv = img @ weights.to_v_ip[self.layer].weight.to(q.device, q.dtype).t()
        return out + self.weight * optimized_attention(q, ik, iv, heads, attn_precision=prec)


def check_fits_unet(layers, blocks) -> None:
    """NodeInputError unless ``layers`` (:attr:`IPAdapterModel.layers`) has one ip layer per cross-attention block
    of ``blocks`` (from :func:`cross_attention_blocks`), each shaped like that block's to_k (inner, context width)."""
    from ..errors import NodeInputError

    if len(blocks) != len(layers):
        raise NodeInputError(NODE_APPLY, "ipadapter",
                             f"an IP-Adapter made for this UNet ({len(blocks)} cross-attention layers)",
                             got=f"{len(layers)} ip layers")
    for (key, attn2), (k_w, _) in zip(blocks, layers):
        if tuple(attn2.to_k.weight.shape) != tuple(k_w.shape):
            raise NodeInputError(NODE_APPLY, "ipadapter",
                                 f"to_k_ip of {key} shaped {tuple(attn2.to_k.weight.shape)} like the UNet's to_k",
                                 got=f"{tuple(k_w.shape)}")


def project_embeds(adapter: IPAdapterModel, embeds: torch.Tensor, input_name: str = "embeds",
                   chunk: int = 16) -> torch.Tensor:
    """Image tokens (F, tokens, cross_dim) float32 on ComfyUI's intermediate device (the CPU) from EMBEDS (plus:
    (F, N, clip_dim); plain: (F, clip_dim)). The adapter is loaded through ComfyUI's model management and
    runs on its load device in chunks of ``chunk`` frames. NodeInputError when the embeds do not fit the
    adapter kind."""
    import comfy.model_management as mm
    from ..errors import NodeInputError
    from . import managed

    if not isinstance(embeds, torch.Tensor):
        raise NodeInputError(NODE_APPLY, input_name, "an EMBEDS tensor", got=type(embeds).__name__)
    if adapter.kind == "plus":
        ok = embeds.ndim == 3 and embeds.shape[-1] == adapter.clip_dim
        want = f"(frames, tokens, {adapter.clip_dim}) penultimate hidden states (IP-Adapter plus)"
    else:
        ok = (embeds.ndim == 2 or (embeds.ndim == 3 and embeds.shape[1] == 1)) and embeds.shape[-1] == adapter.clip_dim
        want = f"(frames, {adapter.clip_dim}) image_embeds (plain IP-Adapter)"
    if not ok:
        raise NodeInputError(NODE_APPLY, input_name, want, got=f"shape {tuple(embeds.shape)}")
    device = managed.load(adapter.patcher)
    outs = []
    with torch.no_grad():
        for s in range(0, embeds.shape[0], chunk):
            mm.throw_exception_if_processing_interrupted()
            x = embeds[s:s + chunk].to(device, torch.float32)
            outs.append(adapter.image_proj(x).to(mm.intermediate_device(), torch.float32))
    return torch.cat(outs, dim=0)


def check_frame_counts(executor, noise, *args, **kwargs):
    """OUTER_SAMPLE wrapper of a per-frame model: every conditioning has one row per latent frame, or one row.

    ComfyUI repeats or cuts conditioning rows to the latent batch without a word (``repeat_to_batch_size``),
    which would shift every frame's prompt; raises NodeInputError on the sampler's conditioning input instead.
    """
    from ..errors import NodeInputError

    frames = noise.shape[0]
    for name, conds in executor.class_obj.conds.items():
        for cond in conds:
            rows = cond["cross_attn"].shape[0] if cond.get("cross_attn") is not None else 1
            if rows not in (1, frames):
                raise NodeInputError(
                    "KSampler", name, f"one conditioning row per latent frame ({frames} latent frames) or one row "
                    f"for every frame, since the model is patched per frame by {NODE_APPLY}",
                    got=f"{rows} rows, which ComfyUI would repeat or cut silently. Use SDN_ConditioningTransition's "
                        f"frame_count as the latent batch size (same frames_per_transition as SDN_TransitionEmbeds)")
    return executor(noise, *args, **kwargs)


def apply_ip_adapter(model_patcher, adapter: IPAdapterModel, embeds: torch.Tensor, negative=None,
                     weight: float = 1.0, start_percent: float = 0.0, end_percent: float = 1.0):
    """A patched clone of ``model_patcher``: every cross-attention block gets an :class:`IPAdapterAttn2`.

    embeds: EMBEDS (F frames; F == 1 applies to every frame), negative: same shape or None (zeros).
    Frame f of the latent batch (of the full video under context windows) uses embeds[f]. An attn2 replace
    patch already on a block (another adapter, another SDN_ApplyTransitionEmbeds) is kept and chained:
    its output replaces the plain text attention, and this adapter's image attention is added to it.
    Sampling with it refuses conditionings whose rows are neither 1 nor the latent frame count
    (:func:`check_frame_counts`); the adapter's weights are loaded together with the UNet (the patches'
    ``models()``). The model carries one :class:`AdapterCalls` APPLY_MODEL wrapper for all its adapters: each
    model call's frames and gate are decided there once, not in the layers. Raises NodeInputError when the
    adapter does not fit the UNet (layer count, widths) or the embeds, UnsupportedModelError for models other than
    image UNets.
    """
    from comfy.patcher_extension import WrappersMP

    from ..errors import NodeInputError

    blocks = cross_attention_blocks(model_patcher)
    check_fits_unet(adapter.layers, blocks)
    pos = project_embeds(adapter, embeds, "embeds")
    if negative is None:
        neg = project_embeds(adapter, torch.zeros_like(embeds), "embeds")
    else:
        if tuple(negative.shape) != tuple(embeds.shape) and not (
                negative.shape[0] == 1 and tuple(negative.shape[1:]) == tuple(embeds.shape[1:])):
            raise NodeInputError(NODE_APPLY, "negative_embeds", f"the shape of embeds {tuple(embeds.shape)}",
                                 got=f"{tuple(negative.shape)}")
        neg = project_embeds(adapter, negative, "negative_embeds")
    if neg.shape[0] == 1 and pos.shape[0] > 1:
        neg = neg.expand(pos.shape[0], -1, -1).contiguous()
    sigma_range = None
    if start_percent > 0.0 or end_percent < 1.0:
        ms = model_patcher.get_model_object("model_sampling")
        sigma_range = (ms.percent_to_sigma(start_percent), ms.percent_to_sigma(end_percent))
    m = model_patcher.clone()
    existing = m.model_options.get("transformer_options", {}).get("patches_replace", {}).get("attn2", {})
    for layer, (key, _) in enumerate(blocks):
        base = existing.get(key, existing.get(key[:2]))
        m.set_model_attn2_replace(IPAdapterAttn2(adapter.patcher, layer, pos, neg, weight, sigma_range, base), *key)
    chained = m.get_wrappers(WrappersMP.APPLY_MODEL, CONTEXT)  # the adapters already on the model
    calls = AdapterCalls(frozenset({pos.shape[0]}.union(*(w.lengths for w in chained))),
                         sigma_range is not None or any(w.gated for w in chained))
    m.remove_wrappers_with_key(WrappersMP.APPLY_MODEL, CONTEXT)
    m.add_wrapper_with_key(WrappersMP.APPLY_MODEL, CONTEXT, calls)
    m.remove_wrappers_with_key(WrappersMP.OUTER_SAMPLE, "sdn_frame_counts")  # once, however many adapters
    m.add_wrapper_with_key(WrappersMP.OUTER_SAMPLE, "sdn_frame_counts", check_frame_counts)
    return m
