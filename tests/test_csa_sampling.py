"""CSA through ComfyUI's real sampler on real SD1.5 / SDXL block layouts (tiny widths, random weights).

The oracle is an independent attn1 replace written here: per cond_or_uncond chunk, each image attends to the
union of its group's tokens (rate 1, where CSA has no randomness) or, with references, to itself + the
references. The pack's patch must match it for every way ComfyUI can batch rows.
"""
import pytest
import torch



from sampling_helpers import close, csa_model, mha_batch, oracle, record_chunks, sample, with_oracle


# sd15, sdxl: conftest's small UNets (weights at scale 0.05: see there).
@pytest.fixture(scope="module")
def loud(sd15, sdxl):
    return {"sd15": sd15, "sdxl": sdxl}


@pytest.mark.parametrize("refs", [0, 2])
def test_cfg_in_one_call_matches_oracle(pack, sd15, refs):
    log = []
    out = sample(record_chunks(csa_model(pack, sd15, refs=refs), log), 4)
    assert all(len(c) == 2 for c in log)
    close(out, sample(with_oracle(sd15, refs), 4))


def test_forced_memory_split_matches_oracle(pack, sd15, monkeypatch):
    import comfy.model_management

    expected = sample(with_oracle(sd15), 3)
    monkeypatch.setattr(comfy.model_management, "get_free_memory", lambda *a, **k: 0)
    log = []
    out = sample(record_chunks(csa_model(pack, sd15), log), 3)
    assert log and all(len(c) == 1 for c in log), log  # cond and uncond arrived in separate calls
    close(out, expected)


def test_split_and_joined_calls_share_the_sampling(pack, sd15, monkeypatch):
    import comfy.model_management

    joined = sample(csa_model(pack, sd15, rate=0.5, seed=3), 3)
    monkeypatch.setattr(comfy.model_management, "get_free_memory", lambda *a, **k: 0)
    close(sample(csa_model(pack, sd15, rate=0.5, seed=3), 3), joined)


def test_cfg_one_matches_oracle(pack, sd15):
    log = []
    out = sample(record_chunks(csa_model(pack, sd15, refs=1), log), 3, cfg=1.0)
    assert log and all(c == [0] for c in log)
    close(out, sample(with_oracle(sd15, refs=1), 3, cfg=1.0))


def test_several_positive_entries_match_oracle(pack, sd15):
    gen = torch.Generator().manual_seed(5)
    positive = [[torch.randn(3, 77, 64, generator=gen), {}], [torch.randn(3, 77, 64, generator=gen), {}]]
    log = []
    out = sample(record_chunks(csa_model(pack, sd15), log), 3, positive=positive)
    assert any(c.count(0) == 2 for c in log), log
    close(out, sample(with_oracle(sd15), 3, positive=positive))


def test_multi_evaluation_sampler_matches_oracle(pack, sd15):
    close(sample(csa_model(pack, sd15), 2, sampler="heun"), sample(with_oracle(sd15), 2, sampler="heun"))


def test_context_windows_group_within_window(pack, sd15, host):
    cw = host.node_class("ContextWindowsManual")
    # The node's own defaults for what this test leaves unset (the node gained inputs after 0.3.75).
    inputs = {**host.default_inputs("ContextWindowsManual"), "context_length": 3, "context_overlap": 1,
              "context_schedule": "standard_static", "fuse_method": "pyramid", "dim": 0}

    def windowed(m):
        return cw.execute(m, **inputs)[0]
    # 5 images in windows of 3: windows without image 0 fall back to all-to-all, as the oracle does.
    # steps=4: ComfyUI 0.3.75's context handler compares sample_sigmas (steps + 1) with the per-image
    # timestep elementwise, which only broadcasts when both have 5 entries.
    log, rows = [], []
    out = sample(record_chunks(windowed(csa_model(pack, sd15, refs=1)), log, rows), 5, steps=4)
    # the model only ever saw windows of 3 images, plus the frame before the window in front of the second
    # window where ComfyUI has causal_window_fix (on by default)
    assert set(rows) == ({3, 4} if inputs.get("causal_window_fix") else {3}), rows
    close(out, sample(windowed(with_oracle(sd15, refs=1)), 5, steps=4))


def test_window_with_references_not_first_is_reordered(pack, sd15):
    # A window whose rows are absolute images [3, 0, 4, 1] (as AnimateDiff-Evolved's can be): references 0 and 1
    # sit at positions 1 and 3.
    from sampling_helpers import core_context_window

    def windowed(m):
        m = m.clone()
        m.model_options["transformer_options"]["context_window"] = core_context_window([3, 0, 4, 1], total_frames=5)
        return m
    close(sample(windowed(csa_model(pack, sd15, refs=2)), 4), sample(windowed(with_oracle(sd15, refs=2)), 4))


def test_sdxl_layout_matches_oracle(pack, sdxl):
    close(sample(csa_model(pack, sdxl, refs=1), 3, kind="sdxl", steps=1),
          sample(with_oracle(sdxl, refs=1), 3, kind="sdxl", steps=1))


def test_sdxl_patches_the_decoder_self_attention_only(pack, sdxl):
    patch = pack("attention.patch")
    m = csa_model(pack, sdxl)
    keys = set(m.model_options["transformer_options"]["patches_replace"]["attn1"])
    expected = {("output", n, d) for n in range(6) for d in range(10 if n < 3 else 2)}
    assert keys == expected  # SDXL up_blocks.0/.1: 36 layers, as the reference app
    assert len(patch.attention_blocks(sdxl)) == 4 + 20 + 10 + 36  # every transformer block found


def test_sd15_patches_output_blocks_3_to_11(pack, sd15):
    keys = set(csa_model(pack, sd15).model_options["transformer_options"]["patches_replace"]["attn1"])
    assert keys == {("output", n, 0) for n in range(3, 12)}  # SD1.5's decoder attention: 1/32, 1/16, 1/8


def test_rate_zero_and_batch_one_are_plain(pack, sd15):
    close(sample(csa_model(pack, sd15, rate=0.0), 3), sample(sd15, 3))
    close(sample(csa_model(pack, sd15, rate=1.0), 1), sample(sd15, 1))


def test_identical_images_at_rate_one_are_plain(pack, sd15):
    # Union attention over B identical copies equals plain attention: a mixed-up grouping would not.
    gen = torch.Generator().manual_seed(9)
    c = torch.randn(1, 77, 64, generator=gen)
    positive = [[c.repeat(3, 1, 1), {}]]
    import comfy.sample
    latent = torch.zeros(3, 4, 16, 16)
    noise = torch.randn(1, 4, 16, 16, generator=gen).repeat(3, 1, 1, 1)
    neg = [[torch.randn(1, 77, 64, generator=gen), {}]]
    run = lambda m: comfy.sample.sample(m, noise, 2, 5.0, "euler", "normal", positive, neg, latent,  # noqa: E731
                                        seed=0, disable_pbar=True)
    close(run(csa_model(pack, sd15)), run(sd15))


def test_seeds_determinism_and_isolation(pack, sd15):
    before = sample(sd15, 3)
    a = sample(csa_model(pack, sd15, rate=0.5, seed=1), 3)
    patched = csa_model(pack, sd15, rate=0.5, seed=1)
    assert torch.equal(sample(patched, 3), a)
    assert torch.equal(sample(patched, 3), a)  # a second run of the same patched model: no carried state
    assert not torch.allclose(sample(csa_model(pack, sd15, rate=0.5, seed=2), 3), a)
    assert not torch.allclose(a, before)
    assert torch.equal(sample(sd15, 3), before)  # the input model is untouched


def test_other_images_influence_each_image(pack, sd15):
    gen = torch.Generator().manual_seed(4)
    p1 = torch.randn(3, 77, 64, generator=gen)
    p2 = p1.clone()
    p2[2] = torch.randn(77, 64, generator=gen)  # change only image 2's prompt
    for model, changes in ((sd15, False), (csa_model(pack, sd15, rate=0.5), True)):
        a = sample(model, 3, positive=[[p1, {}]])
        b = sample(model, 3, positive=[[p2, {}]])
        assert torch.allclose(a[0], b[0]) != changes


def test_storydiffusion_schedule_is_plain_at_step_zero(pack, sd15):
    close(sample(csa_model(pack, sd15, schedule="storydiffusion"), 3, steps=1), sample(sd15, 3, steps=1))
    sd = sample(csa_model(pack, sd15, schedule="storydiffusion", rate=0.5), 3, steps=4)
    assert torch.equal(sd, sample(csa_model(pack, sd15, schedule="storydiffusion", rate=0.5), 3, steps=4))
    assert not torch.allclose(sd, sample(csa_model(pack, sd15, rate=0.5), 3, steps=4))


def test_existing_attn1_replace_is_composed(pack, sd15):
    # A previous replace on the same keys must still run, now over the extended keys.
    calls = []

    def prev(q, k, v, extra):
        calls.append(k.shape[1] > q.shape[1])
        return mha_batch(q, k, v, extra["n_heads"])
    base = sd15.clone()
    for n in range(12):
        base.set_model_attn1_replace(prev, "output", n)
    out = sample(csa_model(pack, base), 3)
    assert calls and all(calls)
    close(out, sample(with_oracle(sd15), 3))



def test_dit_model_is_refused(pack):
    import comfy.model_patcher
    patch = pack("attention.patch")
    errors = pack("errors")

    class FakeDiT(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.diffusion_model = torch.nn.ModuleDict({"double_blocks": torch.nn.ModuleList([torch.nn.Linear(4, 4)])})

    mp = comfy.model_patcher.ModelPatcher(FakeDiT(), torch.device("cpu"), torch.device("cpu"))
    with pytest.raises(errors.UnsupportedModelError, match="DiT"):
        patch.apply_csa(mp, patch.CSASettings())


def test_temporal_layout_is_left_alone(pack, sd15):
    # SVD-style temporal attention reuses attn1 keys with rows = (b*h*w) != the call's rows: plain attention.
    import comfy.patcher_extension as ext

    context = pack("attention.context")
    model = csa_model(pack, sd15)
    layer = model.model_options["transformer_options"]["patches_replace"]["attn1"][("output", 3, 0)]
    (spec,) = model.get_wrappers(ext.WrappersMP.APPLY_MODEL, "storydiffusion_native")
    call = context.Run(spec, [1.0, 0.0], 2, (4, 4), "cpu").describe(torch.zeros(4, 4, 4, 4), 1.0,
                                                                     {"cond_or_uncond": [1, 0]})
    gen = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(2 * 16, 4, 32, generator=gen) for _ in range(3))  # 16 pixels x 2 rows, 4 frames
    extra = {"n_heads": 4, "original_shape": [4, 4, 4, 4], "cond_or_uncond": [1, 0], "sigmas": torch.tensor([1.0]),
             "sample_sigmas": torch.tensor([1.0, 0.0]), "block": ("output", 3), "block_index": 0,
             context.CONTEXT: call}
    close(layer(q, k, v, extra), mha_batch(q, k, v, 4))


def test_pack_import_is_light():
    # ComfyUI imports the package at start-up: its __init__ must import nothing (node modules load later).
    import subprocess
    import sys
    from pathlib import Path

    init = Path(__file__).resolve().parent.parent / "__init__.py"
    code = ("import importlib.util, sys; before = set(sys.modules); "
            f"spec = importlib.util.spec_from_file_location('sdn_pack', {str(init)!r}, submodule_search_locations=[]); "
            "m = importlib.util.module_from_spec(spec); spec.loader.exec_module(m); "
            "print(sorted(set(sys.modules) - before))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]", out


def test_controlnet_alongside_csa(pack, sd15):
    # A ControlNet of the same real layout (random weights) on the positive: CSA still matches the oracle, and
    # the ControlNet still acts (outputs differ from the run without it).
    import comfy.cldm.cldm
    import comfy.controlnet
    import comfy.ops

    from models import init_weights_

    cfg = dict(sd15.model.model_config.unet_config)
    for key in ("transformer_depth_output", "dtype", "image_model", "use_temporal_attention", "use_temporal_resblock"):
        cfg.pop(key, None)
    cn_model = comfy.cldm.cldm.ControlNet(**cfg, hint_channels=3, operations=comfy.ops.disable_weight_init)
    init_weights_(cn_model, seed=3, scale=0.05)
    cn = comfy.controlnet.ControlNet(cn_model, load_device=torch.device("cpu"))  # hint in pixels, 8x the latent
    hint = torch.rand(1, 3, 128, 128, generator=torch.Generator().manual_seed(2))
    gen = torch.Generator().manual_seed(8)
    text = torch.randn(3, 77, 64, generator=gen)

    def positive(with_control):
        extras = {}
        if with_control:
            extras = {"control": cn.copy().set_cond_hint(hint, 1.0, (0.0, 1.0)), "control_apply_to_uncond": True}
        return [[text, extras]]
    out = sample(csa_model(pack, sd15), 3, positive=positive(True))
    close(out, sample(with_oracle(sd15), 3, positive=positive(True)))
    assert not torch.allclose(out, sample(csa_model(pack, sd15), 3, positive=positive(False)), atol=1e-3)


def test_lora_weight_patches_stay_applied(pack, sd15):
    # Weight patches (what LoraLoader adds) and CSA compose: the patched weights are used under CSA.
    lora = sd15.clone()
    sd = sd15.model.state_dict()
    for key in [k for k in sd if k.endswith(("attn1.to_k.weight", "attn1.to_v.weight"))]:
        lora.add_patches({key: (torch.randn(sd[key].shape, generator=torch.Generator().manual_seed(5)) * 0.05,)}, 1.0)
    out = sample(csa_model(pack, lora), 3)
    close(out, sample(with_oracle(lora), 3))
    assert not torch.allclose(out, sample(csa_model(pack, sd15), 3), atol=1e-3)


# Image-level downsampling factor of every attention layer, from the architectures' definitions (SD1.5: input
# 1,2 / 4,5 / 7,8 at 1/8, 1/16, 1/32, middle 1/64, output 3-5 / 6-8 / 9-11 at 1/32, 1/16, 1/8; SDXL: input 4,5 /
# 7,8 at 1/16, 1/32, middle 1/32, output 0-2 / 3-5 at 1/32, 1/16). Layers coarser than 1/32 take the 1/32 rate.
LEVELS = {
    "sd15": {**{("input", n): f for n, f in ((1, 8), (2, 8), (4, 16), (5, 16), (7, 32), (8, 32))}, ("middle", 0): 32,
             **{("output", n): 32 if n < 6 else 16 if n < 9 else 8 for n in range(3, 12)}},
    "sdxl": {**{("input", n): f for n, f in ((4, 16), (5, 16), (7, 32), (8, 32))}, ("middle", 0): 32,
             **{("output", n): 32 if n < 3 else 16 for n in range(6)}},
}


@pytest.mark.parametrize("kind, hw", [("sd15", (6, 6)), ("sd15", (13, 7)), ("sd15", (5, 5)), ("sd15", (7, 9)),
                                      ("sdxl", (6, 6)), ("sdxl", (5, 5))])
def test_each_layer_gets_the_rate_of_its_level_on_odd_latents(pack, loud, kind, hw):
    # Rate 1 (exact oracle) or 0 per level in two runs whose patterns differ for every level and for "off":
    # a layer put in another bucket, or given no rate, differs from the oracle in one of them. Counting tokens
    # gave the 1/32 layers rate 0 on 6x6 (and 13x7, 7x9) and put them at 1/16 on 5x5. SDXL (70 layers, the
    # slow one) runs the two kinds of failure.
    patch = pack("attention.patch")
    model = loud[kind]
    for rates in ({8: 1.0, 16: 0.0, 32: 1.0}, {8: 1.0, 16: 1.0, 32: 0.0}):
        settings = patch.CSASettings(rates=tuple(rates.items()), blocks=("input", "middle", "output"))
        expected = model.clone()
        for name, number, depth in patch.attention_blocks(model):
            if rates[LEVELS[kind][(name, number)]]:
                expected.set_model_attn1_replace(oracle(), name, number, depth)
        run = lambda m: sample(m, 2, cfg=1.0, steps=1, kind=kind, size=hw)  # noqa: E731
        close(run(patch.apply_csa(model, settings)), run(expected))


def test_causal_anchor_window_recognises_references(pack, loud):
    # Current ComfyUI (causal_window_fix, default on) puts the frame before a window in front of it: the model
    # call has len(index_list) + 1 rows = [causal_anchor_index] + index_list. Here absolute frames 2, 3, 4, 5 with
    # references 0..2: frame 2 (the anchor) is the window's only reference.
    from sampling_helpers import core_context_window

    def windowed(m, index_list, anchor=None):
        m = m.clone()
        window = core_context_window(index_list, total_frames=6)
        if anchor is not None:
            window.causal_anchor_index = anchor
        m.model_options["transformer_options"]["context_window"] = window
        return m
    sd15 = loud["sd15"]
    out = sample(windowed(csa_model(pack, sd15, refs=3), [3, 4, 5], anchor=2), 4)
    close(out, sample(windowed(with_oracle(sd15, refs=3), [2, 3, 4, 5]), 4))


def test_video_unet_is_refused(pack, host):
    # Stable Video Diffusion's UNet (temporal attention and res blocks) is not an image model: refused clearly.
    from models import small_svd

    errors = pack("errors")
    node = host.node_class("SDN_ConsistentSelfAttention")
    with pytest.raises(errors.UnsupportedModelError,
                       match=r"SDN_ConsistentSelfAttention: input 'model': expected .*SD1\.x, SD2\.x, SDXL.*temporal"):
        node.execute(small_svd(), 0.5, 0.5, 0.5, 0, 0, "decoder", 0.0, 1.0, "always", 0)
