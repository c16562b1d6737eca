"""Semantic Motion Predictor (StoryDiffusion, arXiv 2405.01434, Sec. 3.2): keyframe CLIP tokens -> per-frame tokens.

The paper encodes the start and end keyframes with a CLIP image encoder (OpenCLIP ViT-H-14), interpolates the
two embeddings linearly to L frames, and maps the sequence with a transformer (8 layers, hidden 1024) to
per-frame embeddings that condition a video diffusion model through IP-Adapter-style cross-attention. The
authors never released code or weights; this module is our reading of that description:

* Input: one SET of tokens per keyframe in the CLIP space, ``(B, T, C)``: ViT-H penultimate hidden states
  ``(257, 1280)`` (what "plus" IP-Adapters consume) or pooled ``image_embeds`` ``(1, 1024)``.
* ``interpolate`` gives ``(B, L, T, C)`` (linear as in the paper, or spherical: see ``interpolate``).
* A pre-norm transformer attends jointly over all ``L * T`` tokens of the clip. It gets the relative frame
  position ``t = i / (L - 1)`` in [0, 1] (Fourier features -> linear) and a learned token-index embedding.
* Output: ``interp + w(t) * residual`` with ``w(t) = 4 t (1 - t)`` (0 at both ends, 1 mid-clip) and the
  residual's output projection initialised to zero. So a fresh predictor returns the interpolation exactly,
  and frames 0 and L-1 are, whatever the weights, the keyframes themselves (they are also copied in
  explicitly, so slerp rounding or a non-finite residual cannot move them).

Heads: the paper prints 12 heads for width 1024, which does not divide (1024 / 12 = 85.33). We use 16 heads of
64 dims, the head size of CLIP/ViT and of the SD UNets, which every fused attention kernel supports.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

INTERPOLATIONS = ("linear", "slerp")
ENCODER_OUTPUTS = ("penultimate_hidden_states", "image_embeds")

DEFAULT_CONFIG = {
    "token_count": 257,          # tokens per frame: 257 = ViT-H/14 penultimate states, 1 = pooled image_embeds
    "token_dim": 1280,           # channels per token: 1280 (ViT-H hidden) or 1024 (ViT-H image_embeds)
    "width": 1024,               # transformer width (paper: 1024)
    "layers": 8,                 # transformer layers (paper: 8)
    "heads": 16,                 # 16 x 64: the paper's 12 does not divide 1024
    "mlp_ratio": 4.0,
    "max_frames": 128,           # longest clip forward() accepts
    "interpolation": "linear",   # default interpolation (paper: linear)
    "frame_freqs": 8,            # Fourier frequencies (pi * 2^k, k < 8) for the relative frame position t
    "encoder_output": "penultimate_hidden_states",  # which CLIP_VISION_OUTPUT field the tokens come from
}


def make_config(**overrides) -> dict:
    """A complete predictor config: ``DEFAULT_CONFIG`` updated with ``overrides`` and validated.

    ``encoder_output`` defaults to ``"image_embeds"`` when ``token_count == 1``. Raises ``ValueError`` on an
    unknown key or an inconsistent value (width not divisible by heads, unknown interpolation...).
    """
    unknown = set(overrides) - set(DEFAULT_CONFIG)
    if unknown:
        raise ValueError(f"unknown motion predictor config keys: {sorted(unknown)}")
    cfg = dict(DEFAULT_CONFIG)
    if overrides.get("token_count") == 1 and "encoder_output" not in overrides:
        cfg["encoder_output"] = "image_embeds"
    cfg.update(overrides)
    return validate_config(cfg)


def validate_config(config: dict) -> dict:
    """Check a config dict (as stored in a checkpoint) and return a normalised copy; ``ValueError`` if bad."""
    if not isinstance(config, dict):
        raise ValueError(f"config must be a dict, got {type(config).__name__}")
    missing = [k for k in DEFAULT_CONFIG if k not in config and k not in ("mlp_ratio", "frame_freqs")]
    if missing:
        raise ValueError(f"config lacks keys {missing}")
    cfg = {**DEFAULT_CONFIG, **config}
    for key in ("token_count", "token_dim", "width", "layers", "heads", "max_frames", "frame_freqs"):
        if not isinstance(cfg[key], int) or isinstance(cfg[key], bool) or cfg[key] < 1:
            raise ValueError(f"config '{key}' must be a positive integer, got {cfg[key]!r}")
    if cfg["width"] % cfg["heads"]:
        raise ValueError(f"config width {cfg['width']} is not divisible by heads {cfg['heads']}")
    if cfg["max_frames"] < 2:
        raise ValueError("config max_frames must be at least 2")
    if cfg["interpolation"] not in INTERPOLATIONS:
        raise ValueError(f"config interpolation must be one of {INTERPOLATIONS}, got {cfg['interpolation']!r}")
    if cfg["encoder_output"] not in ENCODER_OUTPUTS:
        raise ValueError(f"config encoder_output must be one of {ENCODER_OUTPUTS}, got {cfg['encoder_output']!r}")
    if cfg["encoder_output"] == "image_embeds" and cfg["token_count"] != 1:
        raise ValueError("config encoder_output 'image_embeds' needs token_count 1")
    if not float(cfg["mlp_ratio"]) > 0:
        raise ValueError("config mlp_ratio must be > 0")
    return cfg


def frame_positions(num_frames: int, device=None, dtype=torch.float32) -> torch.Tensor:
    """Relative frame positions ``t_i = i / (L - 1)``, shape ``(L,)``; exactly 0.0 and 1.0 at the ends."""
    if num_frames < 2:
        raise ValueError(f"num_frames must be >= 2 (start and end keyframes), got {num_frames}")
    t = torch.arange(num_frames, device=device, dtype=torch.float64) / (num_frames - 1)
    return t.to(dtype)


def interpolate(start: torch.Tensor, end: torch.Tensor, num_frames: int, mode: str = "linear",
                eps: float = 1e-6) -> torch.Tensor:
    """Interpolate keyframe tokens to ``num_frames`` frames, endpoints included.

    start, end: ``(B, T, C)`` (any float dtype, same shape). Returns ``(B, L, T, C)`` in the input dtype;
    frame 0 is ``start`` and frame L-1 is ``end`` exactly. Computed in float32 (float64 for float64 inputs).

    * ``"linear"`` (paper): ``(1 - t) * start + t * end``.
    * ``"slerp"``: per token, over the feature dim C: the direction moves along the great circle from
      ``start/|start|`` to ``end/|end|`` (Shoemake's slerp) while the norm is interpolated LINEARLY,
      ``|x_t| = (1 - t)|start| + t|end|``. So slerp keeps the norm constant when both endpoints have equal
      norms, and it never shrinks the midpoint towards the origin as lerp does between distant directions.
      Where the two directions are (anti)parallel (``sin(angle) < eps``) or a token has zero norm, slerp is
      undefined or unstable and that token falls back to lerp.

    Raises ``ValueError`` for mismatched shapes, ``num_frames < 2`` or an unknown mode.
    """
    if start.shape != end.shape or start.ndim != 3:
        raise ValueError(f"start and end must both be (B, T, C); got {tuple(start.shape)} and {tuple(end.shape)}")
    if mode not in INTERPOLATIONS:
        raise ValueError(f"interpolation must be one of {INTERPOLATIONS}, got {mode!r}")
    out_dtype = start.dtype
    work = torch.float64 if out_dtype == torch.float64 else torch.float32
    a = start.to(work).unsqueeze(1)            # (B, 1, T, C)
    b = end.to(work).unsqueeze(1)
    t = frame_positions(num_frames, device=start.device, dtype=work).view(1, -1, 1, 1)  # (1, L, 1, 1)
    lerp = (1 - t) * a + t * b
    if mode == "slerp":
        na = a.norm(dim=-1, keepdim=True)
        nb = b.norm(dim=-1, keepdim=True)
        ua = a / na.clamp_min(torch.finfo(work).tiny)
        ub = b / nb.clamp_min(torch.finfo(work).tiny)
        cos = (ua * ub).sum(-1, keepdim=True).clamp(-1.0, 1.0)
        omega = torch.arccos(cos)
        sin = torch.sin(omega)
        ok = (sin > eps) & (na > eps) & (nb > eps)
        safe_sin = torch.where(ok, sin, torch.ones_like(sin))
        direction = (torch.sin((1 - t) * omega) * ua + torch.sin(t * omega) * ub) / safe_sin
        norm = (1 - t) * na + t * nb
        lerp = torch.where(ok, norm * direction, lerp)
    out = lerp.to(out_dtype)
    # Exact keyframes at both ends (slerp's sin ratio is not exactly 1 in floating point).
    return torch.cat([start.unsqueeze(1), out[:, 1:-1], end.unsqueeze(1)], dim=1)


def endpoint_window(t: torch.Tensor) -> torch.Tensor:
    """Residual gate ``w(t) = 4 t (1 - t)``: exactly 0 at t = 0 and t = 1, 1 at t = 0.5."""
    return 4.0 * t * (1.0 - t)


class _Block(nn.Module):
    """Pre-norm transformer block: multi-head self-attention + GELU MLP, both residual."""

    def __init__(self, width: int, heads: int, mlp_ratio: float):
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(width)
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)
        self.norm2 = nn.LayerNorm(width)
        hidden = int(round(width * mlp_ratio))
        self.fc1 = nn.Linear(width, hidden)
        self.fc2 = nn.Linear(hidden, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v)
        x = x + self.proj(a.transpose(1, 2).reshape(b, n, c))
        return x + self.fc2(F.gelu(self.fc1(self.norm2(x))))


class SemanticMotionPredictor(nn.Module):
    """Predict per-frame CLIP tokens between two keyframes (see the module docstring for the design).

    ``SemanticMotionPredictor(config)``: ``config`` is a plain dict (``make_config(...)`` fills defaults);
    ``predictor.config`` returns the normalised dict (JSON-serialisable; stored in checkpoints).
    """

    def __init__(self, config: dict | None = None):
        super().__init__()
        cfg = validate_config(make_config() if config is None else config)
        self._config = cfg
        w = cfg["width"]
        self.in_norm = nn.LayerNorm(cfg["token_dim"])
        self.in_proj = nn.Linear(cfg["token_dim"], w)
        self.token_embed = nn.Parameter(torch.randn(cfg["token_count"], w) * 0.02)
        self.frame_proj = nn.Linear(2 * cfg["frame_freqs"] + 1, w)
        self.blocks = nn.ModuleList(_Block(w, cfg["heads"], float(cfg["mlp_ratio"])) for _ in range(cfg["layers"]))
        self.out_norm = nn.LayerNorm(w)
        self.out_proj = nn.Linear(w, cfg["token_dim"])
        # Zero output projection: the untrained predictor is exactly the interpolation.
        nn.init.zeros_(self.out_proj.weight)
        nn.init.zeros_(self.out_proj.bias)

    @property
    def config(self) -> dict:
        return dict(self._config)

    def frame_features(self, t: torch.Tensor) -> torch.Tensor:
        """Fourier features of relative positions ``t`` (L,) -> (L, 2F+1): [t, sin(2^k pi t), cos(2^k pi t)].

        Computed in float32 whatever the module dtype (fp16 would lose the high frequencies).
        """
        t = t.float()
        freqs = math.pi * 2.0 ** torch.arange(self._config["frame_freqs"], device=t.device, dtype=torch.float32)
        ang = t[:, None] * freqs[None]
        return torch.cat([t[:, None], torch.sin(ang), torch.cos(ang)], dim=-1)

    def residual(self, interp: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The transformer's correction for interpolated tokens ``(B, L, T, C)``; same shape, parameter dtype."""
        b, L, T, C = interp.shape
        p = self.in_proj.weight
        x = self.in_proj(self.in_norm(interp.to(p.dtype)))                     # (B, L, T, W)
        x = x + self.token_embed.view(1, 1, T, -1)
        x = x + self.frame_proj(self.frame_features(t).to(p.dtype)).view(1, L, 1, -1)
        x = x.reshape(b, L * T, -1)                                           # joint attention over the clip
        for block in self.blocks:
            x = block(x)
        return self.out_proj(self.out_norm(x)).view(b, L, T, C)

    def forward(self, start: torch.Tensor, end: torch.Tensor, num_frames: int,
                interpolation: str | None = None) -> torch.Tensor:
        """Per-frame tokens ``(B, L, T, C)`` from keyframe tokens ``start``, ``end`` ``(B, T, C)``.

        ``T``/``C`` must match ``config["token_count"]``/``["token_dim"]``; ``2 <= num_frames <= max_frames``.
        ``interpolation``: ``"linear"`` or ``"slerp"`` (default: ``config["interpolation"]``). Output dtype and
        device = the input's; the transformer runs in the parameters' dtype on the input's device (move
        the module first). Frame 0 == start and frame L-1 == end exactly. Raises ``ValueError``.
        """
        cfg = self._config
        mode = interpolation or cfg["interpolation"]
        if start.ndim != 3 or start.shape != end.shape:
            raise ValueError(f"start and end must both be (B, T, C); got {tuple(start.shape)} and {tuple(end.shape)}")
        if tuple(start.shape[1:]) != (cfg["token_count"], cfg["token_dim"]):
            raise ValueError(
                f"this motion predictor takes {cfg['token_count']} tokens of {cfg['token_dim']} channels per "
                f"keyframe ({cfg['encoder_output']}), got {tuple(start.shape[1:])}")
        if not 2 <= int(num_frames) <= cfg["max_frames"]:
            raise ValueError(f"num_frames must be in [2, {cfg['max_frames']}], got {num_frames}")
        L = int(num_frames)
        interp = interpolate(start, end, L, mode)
        if L == 2:
            return interp
        t = frame_positions(L, device=start.device)
        res = self.residual(interp, t)
        win = endpoint_window(t).view(1, L, 1, 1)
        work = torch.float64 if start.dtype == torch.float64 else torch.float32
        mid = (interp.to(work) + win.to(work) * res.to(work)).to(start.dtype)
        return torch.cat([start.unsqueeze(1), mid[:, 1:-1], end.unsqueeze(1)], dim=1)
