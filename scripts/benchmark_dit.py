"""Benchmark: CSA on the DiT families (Flux.1-dev, Flux.2, Chroma, Qwen-Image, Z-Image, Lumina2, SD3 Medium,
SD3.5 Large, SD3.5 Medium, HiDream) beside the vanilla model, side by side.

B story images, cfg 1 (one model call of B rows, as Flux.1-dev runs), rate 0.5. Per family:
  layer   one joint attention of the real shapes (the family's width and heads, 512 text tokens and the image
          tokens of --size px), through ComfyUI's own attention: vanilla (B rows), csa (CSA's joint attention,
          attention/csa.py), bank-free (R references in front: B + R rows, CSA reference_count = R)
  step    one Euler step of the whole model through ComfyUI's stock sampler: vanilla, csa (the node's default
          dit_blocks, single-stream), csa all (every block), bank-free (R references in front, default blocks)
Columns: x vanilla (best of --repeats; on the CPU the process's CPU seconds, all threads); floor: the FLOP
floor over vanilla of what was timed (the model's FLOPs counted on the meta device, plus every extra key scored
once: 4 N M C per image query and patched block); full floor: the same for the full-size model at the same size
(meta device); syncs/call: host syncs per model call (tests/host_syncs.py) on the same layout at small width
(tests/models.py small_flux, small_qwen_image, small_nextdit, small_sd3, small_hidream), the vanilla model's own
plus what the pack adds. The full-size models are the configurations ComfyUI's model detection sets (Flux.1-dev
12B, Flux.2-dev 32B, Chroma 9B, Qwen-Image 20B, Z-Image 6B, Lumina2 2.6B, SD3 Medium 2B, SD3.5 Large 8B, SD3.5
Medium 2.5B, HiDream 17B), random weights. On the CPU the step is timed at reduced width and depth (--width,
--blocks: Flux-like and HiDream double,single; the others, which have one kind of block, their sum; the output
says which); on CUDA (--device cuda) the full models run at 1024 px.
Usage: python scripts/benchmark_dit.py [--device cuda]
       [--families flux1,flux2,chroma,qwen_image,zimage,lumina2,sd3,sd35l,sd35,hidream] [--size 256]
"""
from __future__ import annotations

import argparse
import gc
import sys
from dataclasses import dataclass

from torch.utils._python_dispatch import TorchDispatchMode

from bench_common import DTYPES, best_of, csa_floors, start

TEXT = 512  # text tokens: T5-XXL (Flux.1-dev, Chroma, SD3), Flux.2's padded Mistral prompt; a long Qwen/Gemma prompt;
# HiDream: T5 at its 128 and two streams of a 192-token llama prompt


@dataclass(frozen=True)
class Bench:
    """A benchmarked family: ``label``; ``cls``: its comfy.supported_models class; ``down``: pixels per latent pixel;
    ``full``: the full model's config as ComfyUI's model detection sets it (with the class defaults it relies on);
    ``heads``, ``width``: the config keys of the heads and the width (None: heads x ``head_dim``); ``text``,
    ``pooled``: the config paths (a key, or a tuple of keys and indices) of the text width and the pooled vector's;
    ``depth``: the config keys of the block counts (Flux-like, HiDream: double, single; else one kind); ``llama``:
    HiDream's llama tokens (two streams of them follow its T5 tokens: TEXT in all); ``image_first``: the joint
    sequence is [image, text]."""

    label: str
    cls: str
    down: int
    full: dict
    width: str | None = "hidden_size"
    heads: str = "num_heads"
    text: str | tuple = "context_in_dim"
    depth: tuple = ("depth", "depth_single_blocks")
    head_dim: int = 128
    pooled: str | tuple = "vec_in_dim"
    llama: int = 0
    image_first: bool = False


def get(config: dict, path):
    """``config[path]``, or along a tuple ``path`` of keys and indices (None where a key is missing)."""
    for key in path if isinstance(path, tuple) else (path,):
        config = config[key] if isinstance(key, int) else config.get(key)
    return config


NEXTDIT = {"image_model": "lumina2", "patch_size": 2, "in_channels": 16, "qk_norm": True, "n_refiner_layers": 2}
# MMDiT: width 64 x depth (= heads), one kind of joint block (num_blocks, default depth); text: T5-XXL's 4096 wide
MMDIT = {"in_channels": 16, "patch_size": 2, "out_channels": 16, "input_size": None, "adm_in_channels": 2048,
         "num_patches": 192 * 192, "pos_embed_max_size": 192, "pos_embed_scaling_factor": None,
         "x_block_self_attn_layers": []}
MMDIT_KEYS = dict(width=None, heads="depth", text=("context_embedder_config", "params", "in_features"),
                  depth=("num_blocks",), head_dim=64, pooled="adm_in_channels")


def _embedder(width: int) -> dict:
    return {"target": "torch.nn.Linear", "params": {"in_features": 4096, "out_features": width}}

FAMILIES = {
    "flux1": Bench("Flux.1-dev", "Flux", 8, {
        "image_model": "flux", "in_channels": 16, "out_channels": 16, "patch_size": 2, "hidden_size": 3072,
        "num_heads": 24, "depth": 19, "depth_single_blocks": 38, "context_in_dim": 4096, "vec_in_dim": 768,
        "axes_dim": [16, 56, 56], "theta": 10000, "mlp_ratio": 4.0, "qkv_bias": True, "guidance_embed": True}),
    "flux2": Bench("Flux.2-dev", "Flux2", 16, {
        "image_model": "flux2", "in_channels": 128, "out_channels": 128, "patch_size": 1, "hidden_size": 6144,
        "num_heads": 48, "depth": 8, "depth_single_blocks": 48, "context_in_dim": 15360, "vec_in_dim": None,
        "axes_dim": [32, 32, 32, 32], "theta": 2000, "mlp_ratio": 3.0, "qkv_bias": False, "guidance_embed": True,
        "global_modulation": True, "mlp_silu_act": True, "ops_bias": False, "default_ref_method": "index",
        "ref_index_scale": 10.0}),
    "chroma": Bench("Chroma", "Chroma", 8, {
        "image_model": "chroma", "in_channels": 64, "out_channels": 64, "patch_size": 2, "hidden_size": 3072,
        "num_heads": 24, "depth": 19, "depth_single_blocks": 38, "context_in_dim": 4096, "axes_dim": [16, 56, 56],
        "theta": 10000, "mlp_ratio": 4.0, "qkv_bias": True, "in_dim": 64, "out_dim": 3072, "hidden_dim": 5120,
        "n_layers": 5}),
    "qwen_image": Bench("Qwen-Image", "QwenImage", 8, {  # detection reads in_channels and the block count
        "image_model": "qwen_image", "in_channels": 64, "out_channels": 16, "patch_size": 2, "num_layers": 60,
        "attention_head_dim": 128, "num_attention_heads": 24, "joint_attention_dim": 3584,
        "axes_dims_rope": (16, 56, 56)}, None, "num_attention_heads", "joint_attention_dim", ("num_layers",)),
    "zimage": Bench("Z-Image", "ZImage", 8, dict(NEXTDIT, **{  # cap_feat_dim: Qwen3-4B's width
        "dim": 3840, "n_layers": 30, "n_heads": 30, "n_kv_heads": 30, "cap_feat_dim": 2560, "axes_dims": [32, 48, 48],
        "axes_lens": [1536, 512, 512], "rope_theta": 256.0, "ffn_dim_multiplier": 8.0 / 3.0,
        "z_image_modulation": True, "time_scale": 1000.0, "pad_tokens_multiple": 32}), "dim", "n_heads",
        "cap_feat_dim", ("n_layers",)),
    "lumina2": Bench("Lumina2", "Lumina2", 8, dict(NEXTDIT, **{  # cap_feat_dim: Gemma 2 2B's width
        "dim": 2304, "n_layers": 26, "n_heads": 24, "n_kv_heads": 8, "cap_feat_dim": 2304, "axes_dims": [32, 32, 32],
        "axes_lens": [300, 512, 512], "rope_theta": 10000.0, "ffn_dim_multiplier": 4.0}), "dim", "n_heads",
        "cap_feat_dim", ("n_layers",), head_dim=96),
    "sd3": Bench("SD3 Medium", "SD3", 8, dict(MMDIT, depth=24, context_embedder_config=_embedder(1536)),
                 **MMDIT_KEYS),
    "sd35l": Bench("SD3.5 L", "SD3", 8, dict(MMDIT, depth=38, qk_norm="rms",
                                                 context_embedder_config=_embedder(2432)), **MMDIT_KEYS),
    "sd35": Bench("SD3.5 M", "SD3", 8, dict(MMDIT, depth=24, qk_norm="rms", x_block_self_attn_layers=list(range(13)),
                                              pos_embed_max_size=384, num_patches=384 * 384,
                                              context_embedder_config=_embedder(1536)), **MMDIT_KEYS),
    "hidream": Bench("HiDream", "HiDream", 8, {
        "image_model": "hidream", "attention_head_dim": 128, "axes_dims_rope": [64, 32, 32],
        "caption_channels": [4096, 4096], "max_resolution": [128, 128], "in_channels": 16,
        "llama_layers": list(range(32)) + [31] * 16, "num_attention_heads": 20, "num_routed_experts": 4,
        "num_activated_experts": 2, "num_layers": 16, "num_single_layers": 32, "out_channels": 16, "patch_size": 2,
        "text_emb_dim": 2048}, None, "num_attention_heads", ("caption_channels", -1),
        ("num_layers", "num_single_layers"), pooled="text_emb_dim", llama=192, image_first=True),
}


def model_config(kind: str, width: int | None = None, blocks: tuple | None = None, dtype=None):
    """The comfy.supported_models config of ``kind`` (FAMILIES), full size, or at ``width`` and ``blocks`` when
    given: ``width`` rounded down to whole heads of the family's head width, in whole groups of its query heads per
    key/value head (Lumina2: 3 of 96); ``blocks``: (double, single), their sum for a model of one kind of block
    (SD3.5 Medium keeps its attn2 in the blocks at the same relative depth; HiDream its first llama layers)."""
    import copy
    import dataclasses

    import comfy.ldm.flux.model as flux
    import comfy.supported_models as sm

    bench = FAMILIES[kind]
    config = copy.deepcopy(bench.full)
    if width:
        group = bench.full[bench.heads] // bench.full.get("n_kv_heads", bench.full[bench.heads])
        heads = max(1, width // (bench.head_dim * group)) * group
        config[bench.heads] = heads
        config.update({key: heads * bench.head_dim for key in (bench.width, "out_dim") if key in bench.full})
        if "n_kv_heads" in config:
            config["n_kv_heads"] = heads // group
        if "context_embedder_config" in config:  # MMDiT's text projection, into its width
            config["context_embedder_config"]["params"]["out_features"] = heads * bench.head_dim
    if blocks:
        config.update(zip(bench.depth, blocks) if len(bench.depth) == 2 else {bench.depth[0]: sum(blocks)})
        count, full = sum(blocks), bench.full.get("num_blocks", bench.full.get("depth"))
        if config.get("x_block_self_attn_layers"):
            config["x_block_self_attn_layers"] = [i for i in range(count) if i * full // count in
                                                  bench.full["x_block_self_attn_layers"]]
        if "llama_layers" in config:
            config["llama_layers"] = config["llama_layers"][:count]
    fields = {f.name for f in dataclasses.fields(flux.FluxParams)}
    if config.get("image_model") in ("flux", "flux2") and "txt_ids_dims" in fields:
        config["txt_ids_dims"] = [3] if kind == "flux2" else []  # current ComfyUI's field, as its detection sets it
    if dtype is not None:
        config["dtype"] = dtype
    return getattr(sm, bench.cls)(config)


def latent(config, rows: int, latent_hw) -> tuple:
    """Shape of ``rows`` latents of the model of ``config`` (Qwen-Image's are 5-D with one frame)."""
    fmt = config.latent_format
    return (rows, fmt.latent_channels) + (1,) * (getattr(fmt, "latent_dimensions", 2) - 2) + tuple(latent_hw)


def meta_flops_per_row(pack, kind: str, config, latent_hw) -> tuple:
    """(FLOPs of one row through the diffusion model of ``config``, counted on the meta device; its
    attention.dit.Family). HiDream's mixture of experts routes each token to ``num_activated_experts`` of its
    experts, data-dependent: on the meta device every expert takes an equal share of the routed tokens, which
    gives the exact total (expert FLOPs are linear in their tokens)."""
    import comfy.model_patcher
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    meta = torch.device("meta")
    model = config.get_model({}, device=meta)
    bench, unet = FAMILIES[kind], config.unet_config
    z = lambda *shape: torch.zeros(*shape, device=meta)  # noqa: E731
    extra = {"lumina2": {"num_tokens": TEXT}, "qwen_image": {}, "hidream": {}, None: {}  # None: MMDiT
             }.get(unet.get("image_model"), {"guidance": z(1)})
    if bench.llama:
        extra["encoder_hidden_states_llama3"] = z(1, max(unet["llama_layers"]) + 1, bench.llama,
                                                  unet["caption_channels"][0])
    if get(unet, bench.pooled):  # guidance: Chroma's forward requires it, Flux.1-dev reads it
        extra["y"] = z(1, get(unet, bench.pooled))
    with FlopCounterMode(display=False) as counter, EqualExperts(1 / unet.get("num_routed_experts", 1)):
        model.diffusion_model(z(*latent(config, 1, latent_hw)), z(1), context=z(1, TEXT - 2 * bench.llama,
                                                                              get(unet, bench.text)),
                              transformer_options={}, **extra)
    family = pack("attention.dit").dit_family(comfy.model_patcher.ModelPatcher(model, meta, meta))
    return counter.get_total_flops(), family


class EqualExperts(TorchDispatchMode):
    """Boolean-mask indexing of meta tensors (a mixture of experts' routing): each mask selects ``share`` of its
    elements; a masked write writes nothing."""

    def __init__(self, share: float):
        super().__init__()
        self.share = share

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        import torch

        aten = torch.ops.aten
        masks = [i for i in args[1] if i is not None and i.dtype == torch.bool and i.is_meta] if func in (
            aten.index.Tensor, aten.index_put_.default) else []
        if not masks:
            return func(*args, **(kwargs or {}))
        if func is aten.index.Tensor:
            return args[0].new_empty((round(masks[0].numel() * self.share),) + args[0].shape[masks[0].ndim:])
        return args[0]


def step_fn(model, positive, latent_hw):
    """One Euler step (cfg 1: one model call) of ``model`` through comfy.sample.sample on ``positive``."""
    import comfy.sample
    import torch

    shape = latent(model.model.model_config, positive[0][0].shape[0], latent_hw)
    noise = torch.randn(shape, generator=torch.Generator().manual_seed(1))
    return lambda steps=1: comfy.sample.sample(model, noise, steps, 1.0, "euler", "simple", positive, positive,
                                               torch.zeros(shape), seed=0, disable_pbar=True)


def conds(kind: str, model, n: int, text: int = TEXT):
    """``n`` rows of random conditioning of ``text`` tokens in the model's text width, and a pooled vector (Flux.1,
    SD3 and HiDream read it; ComfyUI's Flux conditioning asks every family of it for one; the others ignore it);
    HiDream: T5 tokens, then the llama hidden states of every layer it reads, as many tokens as TEXT shares."""
    import torch

    bench, unet = FAMILIES[kind], model.model.model_config.unet_config
    gen = torch.Generator().manual_seed(n)
    llama = bench.llama * text // TEXT
    extra = {"pooled_output": torch.randn(n, get(unet, bench.pooled) or 768, generator=gen)}
    if llama:
        extra["conditioning_llama3"] = torch.randn(n, max(unet["llama_layers"]) + 1, llama,
                                                   unet["caption_channels"][0], generator=gen)
    return [[torch.randn(n, text - 2 * llama, get(unet, bench.text), generator=gen), extra]]


def modes(pack, model, images: int, refs: int, rate: float) -> dict:
    """{mode: (patched model, rows)} of the step benchmark."""
    patch, dit = pack("attention.patch"), pack("attention.dit")
    rates = ((16, rate),)
    return {"vanilla": (model, images), "csa": (patch.apply_csa(model, patch.CSASettings(rates=rates)), images),
            "csa all": (patch.apply_csa(model, patch.CSASettings(rates=rates, dit_blocks=dit.DIT_BLOCK_CHOICES["all"])),
                        images),
            "bank-free": (patch.apply_csa(model, patch.CSASettings(rates=rates, reference_count=refs)), images + refs)}


def floors(pack, kind: str, config, latent_hw, args) -> tuple:
    """(FLOP floor of every step mode, blocks per dit_blocks stage) for the model of ``config`` (its FLOPs counted
    on the meta device; the blocks CSA patches as attention.dit.dit_family sees that model)."""
    csa_core = pack("attention.csa")
    bench, unet = FAMILIES[kind], config.unet_config
    per_row, family = meta_flops_per_row(pack, kind, config, latent_hw)
    blocks = {stage: sum(len(indices) for _, indices in family.stages[stage]) for stage in ("double", "single")}
    n = family.image_tokens(latent_hw)
    layer = (n, csa_core.tokens_per_source(n, args.rate), unet[bench.heads] * bench.head_dim)
    default = csa_floors([layer] * blocks["single"], per_row, args.images, args.refs, 1)
    every = csa_floors([layer] * sum(blocks.values()), per_row, args.images, args.refs, 1)
    return {**default, "csa all": every["csa"]}, blocks


def layer_rows(pack, kind: str, latent_hw, args, device, dtype, cuda: bool) -> list:
    """(mode, x vanilla, floor) of one joint attention of the full model's shapes."""
    import torch
    from comfy.ldm.modules.attention import optimized_attention

    csa_core, dit = pack("attention.csa"), pack("attention.dit")
    bench = FAMILIES[kind]
    heads, dim, b, r = bench.full[bench.heads], bench.head_dim, args.images, args.refs
    n_img = dit.Family("", {}, bench.full["patch_size"]).image_tokens(latent_hw)
    span, n = (0, n_img) if bench.image_first else (TEXT, TEXT + n_img), TEXT + n_img
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(b + r, heads, n, dim, generator=gen).to(device, dtype) for _ in range(3))
    attend = lambda q, k, v, mask: optimized_attention(q, k, v, heads, mask=mask, skip_reshape=True)  # noqa: E731
    plans = {refs: csa_core.make_plan(b + refs, n_img, args.rate, refs,
                                      torch.Generator().manual_seed(1)).to(device) for refs in (0, r)}
    rows = {"vanilla": b, "csa": b, "bank-free": b + r}
    times = best_of({"vanilla": lambda: attend(q[:b], k[:b], v[:b], None),
                     "csa": lambda: csa_core.joint_consistent_attention(q[:b], k[:b], v[:b], plans[0], span, attend),
                     "bank-free": lambda: csa_core.joint_consistent_attention(q, k, v, plans[r], span, attend)},
                    args.repeats or (20 if cuda else 3), cuda)
    floor = csa_floors([(n_img, csa_core.tokens_per_source(n_img, args.rate), heads * dim)],
                       4 * n * n * heads * dim, b, r, 1)
    return [(mode, times[mode] / times["vanilla"], floor[mode]) for mode in rows]


def host_syncs(pack, kind: str, args) -> dict:
    """Host syncs per model call of every step mode, on the same layout at small width (two steps: two calls)."""
    from host_syncs import HostSyncs
    from models import small_flux, small_hidream, small_nextdit, small_qwen_image, small_sd3
    from sampling_helpers import record_chunks

    small = {"qwen_image": lambda: small_qwen_image(layers=4), "zimage": lambda: small_nextdit("zimage", layers=4),
             "lumina2": lambda: small_nextdit("lumina2", layers=4), "sd3": lambda: small_sd3("sd3", layers=4),
             "sd35l": lambda: small_sd3("sd3", layers=4), "sd35": lambda: small_sd3("sd35", layers=4),
             "hidream": lambda: small_hidream(double=2, single=2)}
    tiny = small.get(kind, lambda: small_flux(kind, depth=2, single=2))()
    out = {}
    for mode, (m, rows) in modes(pack, tiny, args.images, args.refs, args.rate).items():
        calls = []
        step = step_fn(record_chunks(m.clone(), calls), conds(kind, tiny, rows, text=8), (8, 8))
        with HostSyncs() as syncs:
            step(2)
        out[mode] = syncs.count / len(calls)
    return out


def benchmark(pack, kind: str, args, device, dtype, cuda: bool) -> None:
    import comfy.model_management
    import comfy.model_patcher
    from models import init_weights_

    bench = FAMILIES[kind]
    latent_hw = (args.size // bench.down, args.size // bench.down)
    tag = f"{bench.label:<10} {args.size:>5}"
    for mode, ratio, floor in layer_rows(pack, kind, latent_hw, args, device, dtype, cuda):
        print(f"{tag} {'layer':<5} {mode:<10} {ratio:>9.2f} {floor:>6.3f} {floor:>10.3f} {'':>10}", flush=True)

    reduced = model_config(kind, args.width, args.blocks, dtype)
    inner = reduced.get_model({}, device=device)
    init_weights_(inner.diffusion_model, scale=0.02)
    model = comfy.model_patcher.ModelPatcher(inner, load_device=device, offload_device=device)
    step_modes = modes(pack, model, args.images, args.refs, args.rate)
    story = conds(kind, model, args.images + args.refs)
    times = best_of({mode: step_fn(m, [[story[0][0][-rows:], {k: t[-rows:] for k, t in story[0][1].items()}]],
                                   latent_hw) for mode, (m, rows) in step_modes.items()},
                    args.repeats or (5 if cuda else 2), cuda)
    (floor, blocks), (full, _) = floors(pack, kind, reduced, latent_hw, args), floors(pack, kind, model_config(kind),
                                                                                      latent_hw, args)
    syncs = host_syncs(pack, kind, args)
    for mode in step_modes:
        print(f"{tag} {'step':<5} {mode:<10} {times[mode] / times['vanilla']:>9.2f} {floor[mode]:>6.3f} "
              f"{full[mode]:>10.3f} {syncs[mode]:>10.1f}", flush=True)
    unet = reduced.unet_config
    attn2 = len(unet.get("x_block_self_attn_layers") or ())  # SD3.5 Medium's image-only attentions, patched too
    layout = (f"{blocks['double']} double + {blocks['single']} single blocks" if len(bench.depth) == 2 else
              f"{sum(blocks.values()) - attn2} blocks" + (f", {attn2} with an attn2" if attn2 else "") +
              f" ({blocks['single']} attentions patched by default)")
    print(f"#   {bench.label} step timed at width {unet[bench.heads] * bench.head_dim}, {layout}; "
          f"vanilla {times['vanilla']:.3g} s", flush=True)
    del step_modes, model, inner
    comfy.model_management.unload_all_models()
    gc.collect()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default=None, choices=["cpu", "cuda"])
    ap.add_argument("--families", default=",".join(FAMILIES))
    ap.add_argument("--size", type=int, default=None, help="pixels (default: 1024 on CUDA, 256 on the CPU)")
    ap.add_argument("--width", type=int, default=None, help="timed model's width, in the family's heads (default: "
                                                            "full on CUDA, 768 on the CPU)")
    ap.add_argument("--blocks", default=None, help="timed model's double,single blocks; one kind of block: their "
                                                   "sum (default: full on CUDA, 2,4 on the CPU)")
    ap.add_argument("--images", type=int, default=4)
    ap.add_argument("--refs", type=int, default=1)
    ap.add_argument("--rate", type=float, default=0.5)
    ap.add_argument("--repeats", type=int, default=None, help="timed runs per mode, best taken")
    ap.add_argument("--dtype", default=None, choices=DTYPES, help="default: bf16 on CUDA, else fp32")
    args = ap.parse_args(argv)
    host, cuda, device, dtype, machine = start(args.device, args.dtype, "bf16")
    args.size = args.size or (1024 if cuda else 256)
    args.width = args.width or (None if cuda else 768)
    blocks = args.blocks or (None if cuda else "2,4")
    args.blocks = tuple(int(x) for x in blocks.split(",")) if blocks else None
    print(f"# {machine}; B = {args.images} images, cfg 1, R = {args.refs} reference(s), rate {args.rate}; "
          f"{TEXT} text tokens")
    print(f"{'family':<10} {'px':>5} {'part':<5} {'mode':<10} {'x vanilla':>9} {'floor':>6} {'full floor':>10} "
          f"{'syncs/call':>10}")
    for kind in args.families.split(","):
        benchmark(host.pack_module, kind, args, device, dtype, cuda)
    return 0


if __name__ == "__main__":
    sys.exit(main())
