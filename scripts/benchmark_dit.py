"""Benchmark: CSA on the DiT families (Flux.1-dev, Flux.2, Chroma) beside the vanilla model, side by side.

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
(tests/models.py small_flux), the vanilla model's own plus what the pack adds.
The full-size models are the configurations ComfyUI's model detection sets (Flux.1-dev 12B, Flux.2-dev 32B,
Chroma 9B), random weights. On the CPU the step is timed at reduced width and depth (--width, --blocks; the
output says which); on CUDA (--device cuda) the full models run at 1024 px.
Usage: python scripts/benchmark_dit.py [--device cuda] [--families flux1,flux2,chroma] [--size 256]
"""
from __future__ import annotations

import argparse
import gc
import sys

from bench_common import DTYPES, best_of, csa_floors, start

TEXT = 512  # text tokens: T5-XXL (Flux.1-dev, Chroma) and Flux.2's padded Mistral prompt
HEAD_DIM = 128
FAMILIES = {  # name: (comfy.supported_models class, pixels per latent pixel, the full model as detection sets it)
    "flux1": ("Flux.1-dev", "Flux", 8, {
        "image_model": "flux", "in_channels": 16, "out_channels": 16, "patch_size": 2, "hidden_size": 3072,
        "num_heads": 24, "depth": 19, "depth_single_blocks": 38, "context_in_dim": 4096, "vec_in_dim": 768,
        "axes_dim": [16, 56, 56], "theta": 10000, "mlp_ratio": 4.0, "qkv_bias": True, "guidance_embed": True}),
    "flux2": ("Flux.2-dev", "Flux2", 16, {
        "image_model": "flux2", "in_channels": 128, "out_channels": 128, "patch_size": 1, "hidden_size": 6144,
        "num_heads": 48, "depth": 8, "depth_single_blocks": 48, "context_in_dim": 15360, "vec_in_dim": None,
        "axes_dim": [32, 32, 32, 32], "theta": 2000, "mlp_ratio": 3.0, "qkv_bias": False, "guidance_embed": True,
        "global_modulation": True, "mlp_silu_act": True, "ops_bias": False, "default_ref_method": "index",
        "ref_index_scale": 10.0}),
    "chroma": ("Chroma", "Chroma", 8, {
        "image_model": "chroma", "in_channels": 64, "out_channels": 64, "patch_size": 2, "hidden_size": 3072,
        "num_heads": 24, "depth": 19, "depth_single_blocks": 38, "context_in_dim": 4096, "axes_dim": [16, 56, 56],
        "theta": 10000, "mlp_ratio": 4.0, "qkv_bias": True, "in_dim": 64, "out_dim": 3072, "hidden_dim": 5120,
        "n_layers": 5}),
}


def model_config(kind: str, width: int | None = None, blocks: tuple | None = None, dtype=None):
    """The comfy.supported_models config of ``kind`` (FAMILIES), at ``width`` (heads of 128) and ``blocks``
    (double, single) when given, else full size."""
    import dataclasses

    import comfy.ldm.flux.model as flux
    import comfy.supported_models as sm

    _, cls, _, full = FAMILIES[kind]
    config = dict(full)
    if width:
        config.update(hidden_size=width, num_heads=width // HEAD_DIM, **({"out_dim": width} if "out_dim" in full else {}))
    if blocks:
        config.update(depth=blocks[0], depth_single_blocks=blocks[1])
    if kind != "chroma" and "txt_ids_dims" in {f.name for f in dataclasses.fields(flux.FluxParams)}:
        config["txt_ids_dims"] = [3] if kind == "flux2" else []  # current ComfyUI's field, as its detection sets it
    if dtype is not None:
        config["dtype"] = dtype
    return getattr(sm, cls)(config)


def meta_flops_per_row(config, latent_hw) -> float:
    """FLOPs of one row through the diffusion model of ``config``, counted on the meta device."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    net = config.get_model({}, device=torch.device("meta")).diffusion_model
    unet = config.unet_config
    channels = config.latent_format.latent_channels
    z = lambda *shape: torch.zeros(*shape, device="meta")  # noqa: E731
    extra = {"y": z(1, unet["vec_in_dim"])} if unet.get("vec_in_dim") else {}
    with FlopCounterMode(display=False) as counter:  # guidance: Chroma's forward requires it, Flux.1-dev reads it
        net(z(1, channels, *latent_hw), z(1), context=z(1, TEXT, unet["context_in_dim"]), guidance=z(1),
            transformer_options={}, **extra)
    return counter.get_total_flops()


def step_fn(model, positive, latent_hw):
    """One Euler step (cfg 1: one model call) of ``model`` through comfy.sample.sample on ``positive``."""
    import comfy.sample
    import torch

    rows = positive[0][0].shape[0]
    latent = torch.zeros(rows, model.model.latent_format.latent_channels, *latent_hw)
    noise = torch.randn(latent.shape, generator=torch.Generator().manual_seed(1))
    return lambda steps=1: comfy.sample.sample(model, noise, steps, 1.0, "euler", "simple", positive, positive,
                                               latent, seed=0, disable_pbar=True)


def conds(model, n: int, text: int = TEXT):
    """``n`` rows of random conditioning in the model's text width, and a pooled vector (Flux.1 reads it; ComfyUI's
    Flux conditioning asks every family of it for one)."""
    import torch

    unet = model.model.model_config.unet_config
    gen = torch.Generator().manual_seed(n)
    pooled = torch.randn(n, unet.get("vec_in_dim") or 768, generator=gen)
    return [[torch.randn(n, text, unet["context_in_dim"], generator=gen), {"pooled_output": pooled}]]


def modes(pack, model, images: int, refs: int, rate: float) -> dict:
    """{mode: (patched model, rows)} of the step benchmark."""
    patch, dit = pack("attention.patch"), pack("attention.dit")
    rates = ((16, rate),)
    return {"vanilla": (model, images), "csa": (patch.apply_csa(model, patch.CSASettings(rates=rates)), images),
            "csa all": (patch.apply_csa(model, patch.CSASettings(rates=rates, dit_blocks=dit.DIT_BLOCK_CHOICES["all"])),
                        images),
            "bank-free": (patch.apply_csa(model, patch.CSASettings(rates=rates, reference_count=refs)), images + refs)}


def floors(pack, config, latent_hw, args) -> dict:
    """FLOP floor of every step mode for the model of ``config`` (its FLOPs counted on the meta device)."""
    csa_core, dit = pack("attention.csa"), pack("attention.dit")
    unet = config.unet_config
    n = dit.Family("", {}, unet["patch_size"]).image_tokens(latent_hw)
    m, c = csa_core.tokens_per_source(n, args.rate), unet["hidden_size"]
    per_row = meta_flops_per_row(config, latent_hw)
    single = csa_floors([(n, m, c)] * unet["depth_single_blocks"], per_row, args.images, args.refs, 1)
    every = [(n, m, c)] * (unet["depth"] + unet["depth_single_blocks"])
    return {**single, "csa all": csa_floors(every, per_row, args.images, args.refs, 1)["csa"]}


def layer_rows(pack, kind: str, latent_hw, args, device, dtype, cuda: bool) -> list:
    """(mode, x vanilla, floor) of one joint attention of the full model's shapes."""
    import torch
    from comfy.ldm.modules.attention import optimized_attention

    csa_core, dit = pack("attention.csa"), pack("attention.dit")
    full = FAMILIES[kind][3]
    heads, b, r = full["num_heads"], args.images, args.refs
    n_img = dit.Family("", {}, full["patch_size"]).image_tokens(latent_hw)
    span, n = (TEXT, TEXT + n_img), TEXT + n_img
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(b + r, heads, n, HEAD_DIM, generator=gen).to(device, dtype) for _ in range(3))
    attend = lambda q, k, v, mask: optimized_attention(q, k, v, heads, mask=mask, skip_reshape=True)  # noqa: E731
    plans = {refs: csa_core.make_plan(b + refs, n_img, args.rate, refs,
                                      torch.Generator().manual_seed(1)).to(device) for refs in (0, r)}
    rows = {"vanilla": b, "csa": b, "bank-free": b + r}
    times = best_of({"vanilla": lambda: attend(q[:b], k[:b], v[:b], None),
                     "csa": lambda: csa_core.joint_consistent_attention(q[:b], k[:b], v[:b], plans[0], span, attend),
                     "bank-free": lambda: csa_core.joint_consistent_attention(q, k, v, plans[r], span, attend)},
                    args.repeats or (20 if cuda else 3), cuda)
    floor = csa_floors([(n_img, csa_core.tokens_per_source(n_img, args.rate), heads * HEAD_DIM)],
                       4 * n * n * heads * HEAD_DIM, b, r, 1)
    return [(mode, times[mode] / times["vanilla"], floor[mode]) for mode in rows]


def host_syncs(pack, kind: str, args) -> dict:
    """Host syncs per model call of every step mode, on the same layout at small width (two steps: two calls)."""
    from host_syncs import HostSyncs
    from models import small_flux
    from sampling_helpers import record_chunks

    tiny = small_flux(kind, depth=2, single=2)
    out = {}
    for mode, (m, rows) in modes(pack, tiny, args.images, args.refs, args.rate).items():
        calls = []
        step = step_fn(record_chunks(m.clone(), calls), conds(tiny, rows, text=8), (8, 8))
        with HostSyncs() as syncs:
            step(2)
        out[mode] = syncs.count / len(calls)
    return out


def benchmark(pack, kind: str, args, device, dtype, cuda: bool) -> None:
    import comfy.model_management
    import comfy.model_patcher
    from models import init_weights_

    label, _, down, _ = FAMILIES[kind]
    latent_hw = (args.size // down, args.size // down)
    tag = f"{label:<10} {args.size:>5}"
    for mode, ratio, floor in layer_rows(pack, kind, latent_hw, args, device, dtype, cuda):
        print(f"{tag} {'layer':<5} {mode:<10} {ratio:>9.2f} {floor:>6.3f} {floor:>10.3f} {'':>10}", flush=True)

    reduced = model_config(kind, args.width, args.blocks, dtype)
    inner = reduced.get_model({}, device=device)
    init_weights_(inner.diffusion_model, scale=0.02)
    model = comfy.model_patcher.ModelPatcher(inner, load_device=device, offload_device=device)
    step_modes = modes(pack, model, args.images, args.refs, args.rate)
    story = conds(model, args.images + args.refs)
    times = best_of({mode: step_fn(m, [[story[0][0][-rows:], {k: t[-rows:] for k, t in story[0][1].items()}]],
                                   latent_hw) for mode, (m, rows) in step_modes.items()},
                    args.repeats or (5 if cuda else 2), cuda)
    floor, full = floors(pack, reduced, latent_hw, args), floors(pack, model_config(kind), latent_hw, args)
    syncs = host_syncs(pack, kind, args)
    for mode in step_modes:
        print(f"{tag} {'step':<5} {mode:<10} {times[mode] / times['vanilla']:>9.2f} {floor[mode]:>6.3f} "
              f"{full[mode]:>10.3f} {syncs[mode]:>10.1f}", flush=True)
    unet = reduced.unet_config
    print(f"#   {label} step timed at width {unet['hidden_size']}, {unet['depth']} double + "
          f"{unet['depth_single_blocks']} single blocks; vanilla {times['vanilla']:.3g} s", flush=True)
    del step_modes, model, inner
    comfy.model_management.unload_all_models()
    gc.collect()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default=None, choices=["cpu", "cuda"])
    ap.add_argument("--families", default=",".join(FAMILIES))
    ap.add_argument("--size", type=int, default=None, help="pixels (default: 1024 on CUDA, 256 on the CPU)")
    ap.add_argument("--width", type=int, default=None, help="timed model's width, heads of 128 (default: full on "
                                                            "CUDA, 768 on the CPU)")
    ap.add_argument("--blocks", default=None, help="timed model's double,single blocks (default: full on CUDA, "
                                                   "2,4 on the CPU)")
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
