"""IP-Adapter checkpoints (real key names/shapes, random weights) and per-frame decoupled cross-attention.

Expectations are computed independently: a hand-written reference of the plain/plus image projections, the
UNet without patches, and the frame independence of a UNet without temporal layers (frame f's output only
depends on frame f's inputs), so per-frame routing is checked by comparing against separate calls.
"""
import copy

import pytest
import torch

from models import init_weights_

# SD1.5 cross-attention inner widths in IP-Adapter order (input 1,2,4,5,7,8; output 3..11; middle)
SD15_INNER = [320, 320, 640, 640, 1280, 1280] + [1280] * 3 + [640] * 3 + [320] * 3 + [1280]


def make_ip_state_dict(kind, inner_dims, cross=768, clip_dim=None, tokens=None, depth=4, seed=0, nested=True,
                       dtype=torch.float32):
    """A checkpoint with the real IP-Adapter key layout and random weights."""
    g = torch.Generator().manual_seed(seed)

    def r(*shape, s=0.05):
        return (torch.randn(*shape, generator=g) * s).to(dtype)

    proj = {}
    if kind == "plain":
        clip_dim, tokens = clip_dim or 1024, tokens or 4
        proj = {"proj.weight": r(tokens * cross, clip_dim), "proj.bias": r(tokens * cross),
                "norm.weight": 1 + r(cross), "norm.bias": r(cross)}
    else:
        clip_dim, tokens = clip_dim or 1280, tokens or 16
        proj = {"latents": r(1, tokens, cross, s=cross ** -0.5), "proj_in.weight": r(cross, clip_dim),
                "proj_in.bias": r(cross), "proj_out.weight": r(cross, cross), "proj_out.bias": r(cross),
                "norm_out.weight": 1 + r(cross), "norm_out.bias": r(cross)}
        for i in range(depth):
            p = f"layers.{i}."
            proj.update({p + "0.norm1.weight": 1 + r(cross), p + "0.norm1.bias": r(cross),
                         p + "0.norm2.weight": 1 + r(cross), p + "0.norm2.bias": r(cross),
                         p + "0.to_q.weight": r(cross, cross), p + "0.to_kv.weight": r(2 * cross, cross),
                         p + "0.to_out.weight": r(cross, cross),
                         p + "1.0.weight": 1 + r(cross), p + "1.0.bias": r(cross),
                         p + "1.1.weight": r(4 * cross, cross), p + "1.3.weight": r(cross, 4 * cross)})
    ip = {}
    for i, inner in enumerate(inner_dims):
        n = 2 * i + 1
        ip[f"{n}.to_k_ip.weight"] = r(inner, cross, s=0.2)
        ip[f"{n}.to_v_ip.weight"] = r(inner, cross, s=0.2)
    if nested:
        return {"image_proj": proj, "ip_adapter": ip}
    return {**{"image_proj." + k: v for k, v in proj.items()}, **{"ip_adapter." + k: v for k, v in ip.items()}}


def ref_plain(sd, x):
    p = sd["image_proj"]
    cross = p["norm.weight"].shape[0]
    y = (x @ p["proj.weight"].t() + p["proj.bias"]).reshape(x.shape[0], -1, cross)
    return torch.nn.functional.layer_norm(y, (cross,), p["norm.weight"], p["norm.bias"])


def ref_plus(sd, x, dim_head=64):
    """Perceiver resampler written out with explicit softmax (independent of the pack's module)."""
    p = sd["image_proj"]
    ln = torch.nn.functional.layer_norm
    d = p["latents"].shape[-1]
    x = x @ p["proj_in.weight"].t() + p["proj_in.bias"]
    lat = p["latents"].expand(x.shape[0], -1, -1)
    i = 0
    while f"layers.{i}.0.to_q.weight" in p:
        a = f"layers.{i}.0."
        xn = ln(x, (d,), p[a + "norm1.weight"], p[a + "norm1.bias"])
        ln_ = ln(lat, (d,), p[a + "norm2.weight"], p[a + "norm2.bias"])
        q = ln_ @ p[a + "to_q.weight"].t()
        kv = torch.cat([xn, ln_], 1) @ p[a + "to_kv.weight"].t()
        k, v = kv[..., :kv.shape[-1] // 2], kv[..., kv.shape[-1] // 2:]
        h = q.shape[-1] // dim_head
        sp = lambda t: t.reshape(t.shape[0], t.shape[1], h, dim_head).permute(0, 2, 1, 3)  # noqa: E731
        w = torch.softmax(sp(q) @ sp(k).transpose(-1, -2) / dim_head ** 0.5, -1)
        o = (w @ sp(v)).permute(0, 2, 1, 3).reshape(q.shape)
        lat = o @ p[a + "to_out.weight"].t() + lat
        f = f"layers.{i}.1."
        hdn = ln(lat, (d,), p[f + "0.weight"], p[f + "0.bias"]) @ p[f + "1.weight"].t()
        lat = torch.nn.functional.gelu(hdn) @ p[f + "3.weight"].t() + lat
        i += 1
    out = lat @ p["proj_out.weight"].t() + p["proj_out.bias"]
    return ln(out, (out.shape[-1],), p["norm_out.weight"], p["norm_out.bias"])


def sd15_unet_config(model_channels, context_dim):
    # transformer_depth_output is consumed with pop() (last element = output block 0): SD1.5 has
    # attention in output blocks 3..11, i.e. zeros at the END of the list.
    return {"use_checkpoint": False, "image_size": 32, "out_channels": 4, "use_spatial_transformer": True,
            "legacy": False, "adm_in_channels": None, "in_channels": 4, "model_channels": model_channels,
            "num_res_blocks": [2, 2, 2, 2], "transformer_depth": [1, 1, 1, 1, 1, 1, 0, 0],
            "channel_mult": [1, 2, 4, 4], "transformer_depth_middle": 1, "use_linear_in_transformer": False,
            "context_dim": context_dim, "num_heads": 8, "num_head_channels": -1,
            "transformer_depth_output": [1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0], "dtype": torch.float32}


@pytest.fixture(scope="module")
def unet(host):
    """SD1.5 block layout (attention in output 3..11), tiny widths, context 64."""
    import comfy.model_patcher
    import comfy.supported_models as sm

    cfg = sm.SD15(sd15_unet_config(32, 64))
    model = cfg.get_model({}, device=torch.device("cpu"))
    init_weights_(model.diffusion_model, seed=1, scale=0.1)
    return comfy.model_patcher.ModelPatcher(model, load_device=torch.device("cpu"),
                                            offload_device=torch.device("cpu"))


@pytest.fixture(scope="module")
def ipmod(pack):
    return pack("motion.ip_adapter")


def inner_dims(ipmod, unet):
    return [a.to_k.weight.shape[0] for _, a in ipmod.cross_attention_blocks(unet)]


def test_block_order_is_sd15_ip_adapter_order(ipmod, unet):
    keys = [k for k, _ in ipmod.cross_attention_blocks(unet)]
    expected = ([("input", i, 0) for i in (1, 2, 4, 5, 7, 8)] + [("output", i, 0) for i in range(3, 12)]
                + [("middle", 0, 0)])
    assert keys == expected
    # widths follow the per-processor channel list of IP-Adapter SD1.5 (scaled by model_channels 32/320)
    assert inner_dims(ipmod, unet) == [w // 10 for w in SD15_INNER]


@pytest.mark.parametrize("kind", ["plain", "plus"])
def test_real_shape_checkpoints_parse_and_fit_full_sd15(ipmod, kind, errors_mod):
    from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel
    import comfy.ops

    sd = make_ip_state_dict(kind, SD15_INNER, nested=(kind == "plain"), depth=4 if kind == "plus" else 0)
    ad = ipmod.parse_state_dict(sd)
    assert ad.kind == kind
    assert (ad.tokens, ad.clip_dim, ad.cross_dim) == ((4, 1024, 768) if kind == "plain" else (16, 1280, 768))
    assert len(ad.layers) == 16
    # the full-width SD1.5 UNet (meta device: shapes only) accepts it
    cfg = sd15_unet_config(320, 768)
    cfg.pop("dtype")
    with torch.device("meta"):
        full = UNetModel(**cfg, dtype=torch.float32, device="meta", operations=comfy.ops.disable_weight_init)

    class _P:  # what cross_attention_blocks reads from a ModelPatcher
        model = type("M", (), {"diffusion_model": full})()

    ipmod.check_fits_unet(ad.layers, ipmod.cross_attention_blocks(_P))
    # an adapter with a layer missing or a wrong width is refused
    with pytest.raises(errors_mod.NodeInputError, match="16 cross-attention layers"):
        ipmod.check_fits_unet(ad.layers[:-1], ipmod.cross_attention_blocks(_P))
    with pytest.raises(errors_mod.NodeInputError, match="to_k_ip"):
        ipmod.check_fits_unet([(k[:, :700], v) for k, v in ad.layers], ipmod.cross_attention_blocks(_P))


@pytest.fixture(scope="module")
def errors_mod(pack):
    return pack("errors")


def test_projection_matches_reference(ipmod):
    sd = make_ip_state_dict("plus", [32], cross=128, clip_dim=48, tokens=6, depth=2, seed=3)
    ad = ipmod.parse_state_dict(sd)
    x = torch.randn(3, 10, 48)
    torch.testing.assert_close(ad.image_proj(x), ref_plus(sd, x), rtol=1e-4, atol=1e-5)
    sd = make_ip_state_dict("plain", [32], cross=64, clip_dim=24, tokens=4, seed=4)
    ad = ipmod.parse_state_dict(sd)
    x = torch.randn(3, 24)
    torch.testing.assert_close(ad.image_proj(x), ref_plain(sd, x))


def test_unknown_layout_refused(ipmod, errors_mod):
    sd = make_ip_state_dict("plain", [32], cross=64, clip_dim=24)
    sd["image_proj"]["proj.2.weight"] = torch.zeros(1)  # an MLP projection (FaceID-like)
    with pytest.raises(errors_mod.NodeInputError, match="image_proj"):
        ipmod.parse_state_dict(sd)
    sd = make_ip_state_dict("plain", [32, 32], cross=64, clip_dim=24)
    sd["ip_adapter"]["4.to_k_ip.weight"] = sd["ip_adapter"].pop("3.to_k_ip.weight")
    sd["ip_adapter"]["4.to_v_ip.weight"] = sd["ip_adapter"].pop("3.to_v_ip.weight")
    with pytest.raises(errors_mod.NodeInputError, match="numbered"):
        ipmod.parse_state_dict(sd)


# ---------------------------------------------------------------------------------------------------
# injection on the tiny UNet

F = 4


@pytest.fixture(scope="module")
def small_plus(ipmod, unet):
    return ipmod.parse_state_dict(make_ip_state_dict("plus", inner_dims(ipmod, unet), cross=64, clip_dim=48,
                                                     tokens=8, depth=1, seed=5))


def run_unet(m, x, cond_or_uncond=(0,), extra=None, ctx=None, sigma=5.0):
    """One model call the way calc_cond_batch makes it (rows = chunk * B + frame), through the model's apply_model
    with the patcher's wrappers, as the sampler runs them."""
    chunks = len(cond_or_uncond)
    b = x.shape[0]
    g = torch.Generator().manual_seed(7)
    if ctx is None:
        ctx = torch.randn(1, 77, 64, generator=g).expand(b * chunks, -1, -1)
    sigmas = torch.full((b * chunks,), sigma)
    to = {**m.model_options["transformer_options"], "wrappers": m.wrappers, "cond_or_uncond": list(cond_or_uncond),
          "sigmas": sigmas, **(extra or {})}
    with torch.no_grad():
        return m.model.apply_model(x.repeat(chunks, 1, 1, 1), sigmas, c_crossattn=ctx, transformer_options=to)


@pytest.fixture(scope="module")
def latents():
    return torch.randn(F, 4, 16, 16, generator=torch.Generator().manual_seed(11))


@pytest.fixture(scope="module")
def embeds():
    return torch.randn(F, 10, 48, generator=torch.Generator().manual_seed(12))


def test_weight_zero_is_unpatched_exactly(ipmod, unet, small_plus, latents, embeds):
    base = run_unet(unet, latents)
    m0 = ipmod.apply_ip_adapter(unet, small_plus, embeds, weight=0.0)
    assert torch.equal(run_unet(m0, latents), base)
    assert "patches_replace" not in unet.model_options["transformer_options"]  # the input is not patched
    m1 = ipmod.apply_ip_adapter(unet, small_plus, embeds, weight=1.0)
    out = run_unet(m1, latents)
    assert all((out[f] - base[f]).abs().max() > 1e-4 for f in range(F))


def test_only_the_changed_frame_changes(ipmod, unet, small_plus, latents, embeds):
    j = 2
    other = embeds.clone()
    other[j] += torch.randn_like(other[j])
    a = run_unet(ipmod.apply_ip_adapter(unet, small_plus, embeds), latents)
    b = run_unet(ipmod.apply_ip_adapter(unet, small_plus, other), latents)
    diff = (a - b).flatten(1).abs().amax(1)
    assert diff[j] > 1e-4
    assert torch.all(diff[[f for f in range(F) if f != j]] == 0)


def test_cond_uncond_routing(ipmod, unet, small_plus, latents, embeds):
    neg = torch.randn_like(embeds)
    m = ipmod.apply_ip_adapter(unet, small_plus, embeds, negative=neg)
    both = run_unet(m, latents, cond_or_uncond=(1, 0))
    pos_only = run_unet(ipmod.apply_ip_adapter(unet, small_plus, embeds), latents)
    neg_as_pos = run_unet(ipmod.apply_ip_adapter(unet, small_plus, neg), latents)
    torch.testing.assert_close(both[:F], neg_as_pos, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(both[F:], pos_only, rtol=1e-4, atol=1e-5)
    # cond and uncond in separate calls (memory pressure / cfg 1)
    torch.testing.assert_close(run_unet(m, latents, cond_or_uncond=(1,)), neg_as_pos, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(run_unet(m, latents, cond_or_uncond=(0,)), pos_only, rtol=1e-4, atol=1e-5)
    assert (both[:F] - both[F:]).abs().max() > 1e-4


def test_context_windows_slice_embeds(ipmod, unet, small_plus, latents, embeds, errors_mod):
    from sampling_helpers import core_context_window

    m = ipmod.apply_ip_adapter(unet, small_plus, embeds)
    full = run_unet(m, latents)
    window = [1, 3]
    core = run_unet(m, latents[window], extra={"context_window": core_context_window(window, F)})
    torch.testing.assert_close(core, full[window], rtol=1e-4, atol=1e-5)
    ad = {"ad_params": {"full_length": F, "context_length": 2, "sub_idxs": [0, 2]}}
    out = run_unet(m, latents[[0, 2]], cond_or_uncond=(1, 0), extra=ad)
    torch.testing.assert_close(out[2:], full[[0, 2]], rtol=1e-4, atol=1e-5)
    # wrong counts are clear errors
    with pytest.raises(errors_mod.NodeInputError, match="embeds"):
        run_unet(m, latents[:3])
    with pytest.raises(errors_mod.NodeInputError, match="6 latent frames"):
        run_unet(m, latents[[0, 2]], extra={"ad_params": {"full_length": 6, "context_length": 2, "sub_idxs": [0, 2]}})


def test_two_applications_chain(ipmod, unet, small_plus, latents, embeds):
    half = ipmod.apply_ip_adapter(ipmod.apply_ip_adapter(unet, small_plus, embeds, weight=0.5), small_plus, embeds,
                                  weight=0.5)
    from comfy.patcher_extension import WrappersMP

    assert len(half.get_wrappers(WrappersMP.APPLY_MODEL, ipmod.CONTEXT)) == 1  # one per patched model
    torch.testing.assert_close(run_unet(half, latents),
                               run_unet(ipmod.apply_ip_adapter(unet, small_plus, embeds, weight=1.0), latents),
                               rtol=1e-4, atol=1e-5)


def test_single_embed_applies_to_every_frame(ipmod, unet, small_plus, latents, embeds):
    one = run_unet(ipmod.apply_ip_adapter(unet, small_plus, embeds[:1]), latents)
    rep = run_unet(ipmod.apply_ip_adapter(unet, small_plus, embeds[:1].expand(F, -1, -1)), latents)
    torch.testing.assert_close(one, rep, rtol=1e-4, atol=1e-5)


def test_start_end_percent_gate(ipmod, unet, small_plus, latents, embeds):
    base = run_unet(unet, latents)
    # sigma 5.0 is early in sampling (high noise): a window that starts at 90% skips it
    late = ipmod.apply_ip_adapter(unet, small_plus, embeds, start_percent=0.9, end_percent=1.0)
    assert torch.equal(run_unet(late, latents), base)
    early = ipmod.apply_ip_adapter(unet, small_plus, embeds, start_percent=0.0, end_percent=0.3)
    assert (run_unet(early, latents) - base).abs().max() > 1e-4
    # an adapter chained after it without a range keeps its gate (the model's one wrapper knows both)
    assert torch.equal(run_unet(ipmod.apply_ip_adapter(late, small_plus, embeds, weight=0.0), latents), base)


def test_unet_called_without_its_wrappers_is_refused(ipmod, unet, small_plus, latents, embeds, errors_mod):
    # the layers only look up what the model's APPLY_MODEL wrapper decided for the call; called bare they say so
    m = ipmod.apply_ip_adapter(unet, small_plus, embeds)
    to = {**m.model_options["transformer_options"], "cond_or_uncond": [0]}
    with pytest.raises(errors_mod.StoryDiffusionError, match="SDN_ApplyTransitionEmbeds.*outside.*sampler"):
        m.model.diffusion_model(latents, torch.full((F,), 500.0), context=torch.zeros(F, 77, 64),
                                transformer_options=to)


def test_adds_no_host_sync_per_layer(ipmod, unet, small_plus, embeds):
    # Two chained adapters on 16 cross-attention layers, both gated by start/end percent, one per-frame and one
    # with a single embed: a device read or a tensor made from host data in every layer call would add 64 per
    # model call. The wrapper's one read of the call's sigma and one index tensor per embeds length are all the
    # adapters may add.
    from host_syncs import syncs_per_call

    plain = syncs_per_call(unet, images=2, kind="sd15", steps=1, copies=True)
    m = ipmod.apply_ip_adapter(unet, small_plus, embeds[:2], start_percent=0.0, end_percent=0.9)
    m = ipmod.apply_ip_adapter(m, small_plus, embeds[:1], start_percent=0.0, end_percent=0.5)
    patched = syncs_per_call(m, images=2, kind="sd15", steps=1, copies=True)
    assert patched - plain <= 3, (plain, patched)


def test_plain_kind_and_embeds_mismatch(ipmod, unet, latents, errors_mod):
    ad = ipmod.parse_state_dict(make_ip_state_dict("plain", inner_dims(ipmod, unet), cross=64, clip_dim=24, seed=8))
    e = torch.randn(F, 24)
    out = run_unet(ipmod.apply_ip_adapter(unet, ad, e), latents)
    assert (out - run_unet(unet, latents)).abs().max() > 1e-4
    with pytest.raises(errors_mod.NodeInputError, match="image_embeds"):
        ipmod.apply_ip_adapter(unet, ad, torch.randn(F, 10, 24))


def test_loader_node_reads_bin_and_safetensors(host, pack, ipmod):
    import folder_paths
    import safetensors.torch

    from pathlib import Path

    pack("nodes.transition_nodes").ipadapter_files()  # registers the folder
    folder = Path(folder_paths.get_folder_paths("ipadapter")[0])
    folder.mkdir(parents=True, exist_ok=True)
    plain = make_ip_state_dict("plain", SD15_INNER, nested=True, dtype=torch.float16)
    torch.save(plain, folder / "test-ip-adapter_sd15.bin")
    plus = make_ip_state_dict("plus", SD15_INNER, nested=False, dtype=torch.float16)
    safetensors.torch.save_file(plus, str(folder / "test-ip-adapter-plus_sd15.safetensors"))
    for name, kind in (("test-ip-adapter_sd15.bin", "plain"), ("test-ip-adapter-plus_sd15.safetensors", "plus")):
        res = host.run({"1": {"class_type": "SDN_IPAdapterLoader", "inputs": {"ipadapter_name": name}},
                        "2": {"class_type": "PreviewAny", "inputs": {"source": ["1", 0]}}})
        ad = res.node_output("1")
        assert ad.kind == kind and len(ad.layers) == 16
        k_ref = (plain["ip_adapter"]["1.to_k_ip.weight"] if kind == "plain" else plus["ip_adapter.1.to_k_ip.weight"])
        assert torch.equal(ad.layers[0][0], k_ref.float())


def test_causal_anchor_window_through_the_sampler(ipmod, unet, small_plus):
    # Current ComfyUI puts the frame before a window in front of it (rows = [anchor] + index_list): a window
    # of frames 3..5 with anchor 2 must read embeds 2..5, as a plain window over frames 2..5 does.
    from sampling_helpers import sample, windowed

    video = torch.randn(6, 10, 48, generator=torch.Generator().manual_seed(13))
    m = ipmod.apply_ip_adapter(unet, small_plus, video)
    out = sample(windowed(m, [3, 4, 5], anchor=2), 4, steps=1)
    torch.testing.assert_close(out, sample(windowed(m, [2, 3, 4, 5]), 4, steps=1))
    assert not torch.allclose(out, sample(windowed(m, [0, 1, 2, 3]), 4, steps=1))


def test_per_frame_conditioning_must_match_the_latent_batch(ipmod, unet, small_plus, embeds, errors_mod):
    # ComfyUI repeats or cuts conditioning rows to the latent batch without a word; a per-frame model refuses.
    from sampling_helpers import sample

    m = ipmod.apply_ip_adapter(unet, small_plus, embeds)
    gen = torch.Generator().manual_seed(14)
    with pytest.raises(errors_mod.NodeInputError, match=r"'positive'.*4 latent frames.*got 3 rows"):
        sample(m, F, steps=1, positive=[[torch.randn(3, 77, 64, generator=gen), {}]])
    with pytest.raises(errors_mod.NodeInputError, match=r"'positive'.*4 latent frames.*got 5 rows"):
        sample(m, F, steps=1, positive=[[torch.randn(5, 77, 64, generator=gen), {}]])
    sample(m, F, steps=1, positive=[[torch.randn(1, 77, 64, generator=gen), {}]])  # one row for every frame
    sample(m, F, steps=1)  # one row per frame


def test_video_unet_is_refused(ipmod, errors_mod):
    # Stable Video Diffusion's UNet (spatial + temporal transformers) is not what the adapters were made for,
    # even with an adapter whose layers fit its cross-attention widths.
    from models import small_svd

    svd = small_svd()
    dm = svd.model.diffusion_model
    inner = [tb.attn2.to_k.weight.shape[0] for blocks in (dm.input_blocks, dm.output_blocks, [dm.middle_block])
             for block in blocks for layer in block for tb in getattr(layer, "transformer_blocks", [])]
    adapter = ipmod.parse_state_dict(make_ip_state_dict("plus", inner, cross=64, clip_dim=48, tokens=8, depth=1))
    with pytest.raises(errors_mod.UnsupportedModelError, match=r"SDN_ApplyTransitionEmbeds: input 'model'.*temporal"):
        ipmod.apply_ip_adapter(svd, adapter, torch.randn(F, 10, 48))


def test_embeds_of_another_length_than_a_core_windowed_video(ipmod, unet, small_plus, latents, embeds, errors_mod):
    # Current ComfyUI's windows know the video length: 4 embeds for an 8-frame video are refused, not half used.
    from sampling_helpers import core_context_window

    m = ipmod.apply_ip_adapter(unet, small_plus, embeds)
    window = core_context_window([1, 2, 3], total_frames=8)
    window.causal_anchor_index, window.total_frames = 0, 8  # total_frames: also on 0.3.75's window
    with pytest.raises(errors_mod.NodeInputError, match="8 latent frames"):
        run_unet(m, latents, extra={"context_window": window})
    window.total_frames = F
    torch.testing.assert_close(run_unet(m, latents, extra={"context_window": window}), run_unet(m, latents),
                               rtol=1e-4, atol=1e-5)
