"""CSA on DiT models (issue 9): the joint-attention adapter through ComfyUI's real sampler, against an independent
per-image oracle written from the semantics: in each cond_or_uncond chunk, the IMAGE queries of image i attend to
its own joint sequence plus the image tokens of the other images (rate 1: all of them), its TEXT queries to its
own sequence only."""
import itertools

import pytest
import torch

from models import small_flux, small_hidream, small_nextdit, small_qwen_image, small_sd3
from sampling_helpers import close, mha

KINDS = ("flux1", "schnell", "chroma", "flux2", "qwen", "lumina2", "zimage")
NEXTDIT = ("lumina2", "zimage")
TEXT = 6  # text tokens of the test conditioning (Flux.2 pads them to 512, Z-Image to 32)


def text_tokens(kind):
    return {"flux2": 512, "zimage": 32}.get(kind, TEXT)


def small_dit(kind, **kw):
    if kind in NEXTDIT:
        return small_nextdit(kind, **kw)
    return small_qwen_image(**kw) if kind == "qwen" else small_flux(kind, **kw)


def nextdit_layout(kind, layers=1, size=6):
    """joint_oracle's arguments for NextDiT (which names no block on 0.3.75): its ``layers`` main blocks are its
    calls over the whole padded sequence; Z-Image pads the image tokens to 32 too."""
    if kind not in NEXTDIT:
        return {}
    image = (size // 2) ** 2
    return {"image": image, "layers": layers,
            "joint": text_tokens(kind) + (32 if kind == "zimage" else image)}


def sample_dit(model, b, kind, cfg=1.0, steps=2, seed=0, size=6):
    """Sample a ``b``-image batch of a small DiT with the stock sampler (``size``: latent side, or (height, width);
    Qwen-Image's latents are 5-D with one frame)."""
    import comfy.sample

    gen = torch.Generator().manual_seed(123)
    extra = lambda n: {"pooled_output": torch.randn(n, 32, generator=gen)}  # noqa: E731  (Flux's encode_adm reads it)
    positive = [[torch.randn(b, TEXT, 32, generator=gen), extra(b)]]
    negative = [[torch.randn(1, TEXT, 32, generator=gen), extra(1)]]
    channels = {"flux2": 128, "qwen": 16}.get(kind, 16)
    hw = (size, size) if isinstance(size, int) else size
    latent = torch.zeros(b, channels, 1, *hw) if kind == "qwen" else torch.zeros(b, channels, *hw)
    noise = comfy.sample.prepare_noise(latent, seed)
    return comfy.sample.sample(model, noise, steps, cfg, "euler", "simple", positive, negative, latent, seed=seed,
                               disable_pbar=True)


def joint_oracle(text, blocks, refs=0, image=None, joint=None, layers=None, partners=None):
    """Independent CSA at rate 1 in the joint attention of ``blocks`` ((block_type, index), ...): a loop over the
    images of every chunk building each image's keys (text + image of its own row; image queries also the image
    tokens of the other images, or of the references in reference mode). ``image``: the image tokens after the
    text (None: all the rest; padding after them attends to its own row). ``joint``, ``layers``: only calls over
    ``joint`` tokens are blocks, the ``layers`` blocks of a model that names none, in order. ``partners(i, b)``:
    the images image i shares with (a sliding window), default all others."""
    calls = itertools.count()

    def override(func, q, k, v, heads, *args, **kwargs):
        opts = kwargs["transformer_options"]
        block = (opts.get("block_type"), opts.get("block_index"))
        if joint is not None and q.shape[2] == joint and block[1] is None:
            block = ("double", next(calls) % layers)
        if block not in blocks or joint is not None and q.shape[2] != joint:
            return func(q, k, v, heads, *args, **kwargs)
        n = q.shape[2]
        return per_image(q, k, v, len(opts["cond_or_uncond"]), (text, n if image is None else text + image), refs,
                         partners)
    return override


def per_image(q, k, v, chunks, span, refs=0, partners=None):
    """The oracle's attention on ``[rows, heads, N, D]``: a loop over the images of every chunk; the queries of the
    image tokens ``span`` of image i see its own row plus the ``span`` tokens of its partners (the other images, or
    the references in reference mode), every other query its own row. Returns ``[rows, N, heads * D]``."""
    rows, h, n, d = q.shape
    s, e = span
    b = rows // chunks
    flat = lambda t: t.transpose(0, 1).reshape(t.shape[1], h * d)  # noqa: E731  [h, n, d] -> [n, h*d]
    out = torch.empty(rows, n, h * d, dtype=q.dtype)
    for row in range(rows):
        chunk, i = divmod(row, b)
        if partners is not None:
            seen = partners(i, b)
        elif refs and i < refs:
            seen = [j for j in range(refs) if j != i]
        elif refs:
            seen = list(range(refs))
        else:
            seen = [j for j in range(b) if j != i]
        others = [chunk * b + j for j in seen]
        kk = torch.cat([flat(k[row])] + [flat(k[r])[s:e] for r in others])
        vv = torch.cat([flat(v[row])] + [flat(v[r])[s:e] for r in others])
        own = torch.cat((torch.arange(s), torch.arange(e, n)))
        if len(own):
            out[row, own] = mha(flat(q[row])[own], flat(k[row]), flat(v[row]), h)
        out[row, s:e] = mha(flat(q[row])[s:e], kk, vv, h)
    return out


def with_override(model, override):
    m = model.clone()
    m.model_options.setdefault("transformer_options", {})["optimized_attention_override"] = override
    return m


def csa(pack, model, rate=1.0, refs=0, dit_blocks=("double", "single"), **kw):
    patch = pack("attention.patch")
    return patch.apply_csa(model, patch.CSASettings(rates=((8, rate), (16, rate), (32, rate)), reference_count=refs,
                                                    dit_blocks=dit_blocks, **kw))


ALL = {("double", 0), ("single", 0)}


@pytest.mark.parametrize("kind", KINDS)
def test_rate_one_is_the_joint_oracle(host, pack, kind):
    """Rate 1, every block, CFG 3 (two chunks in one call): equal to the per-image oracle; and CSA is visible."""
    model = small_dit(kind)
    got = sample_dit(csa(pack, model), 3, kind, cfg=3.0)
    oracle = joint_oracle(text_tokens(kind), ALL, **nextdit_layout(kind))
    close(got, sample_dit(with_override(model, oracle), 3, kind, cfg=3.0))
    assert (got - sample_dit(model, 3, kind, cfg=3.0)).abs().max() > 1e-3, "CSA changed nothing"


@pytest.mark.parametrize("kind", ("flux1", "chroma", "qwen", "zimage"))
def test_reference_mode_and_cfg_one_match_the_oracle(host, pack, kind):
    """R = 2 references of 4 images, guidance-distilled cfg 1 (one chunk): the references share among themselves,
    the others see the references' image tokens only."""
    model = small_dit(kind)
    got = sample_dit(csa(pack, model, refs=2), 4, kind)
    oracle = joint_oracle(text_tokens(kind), ALL, refs=2, **nextdit_layout(kind))
    close(got, sample_dit(with_override(model, oracle), 4, kind))


@pytest.mark.parametrize("kind", ("flux1", "zimage"))
def test_cond_and_uncond_in_separate_calls_match_the_oracle(host, pack, kind, monkeypatch):
    """Under memory pressure ComfyUI runs cond and uncond in separate model calls (one chunk each): each chunk is
    still its own group (oracle), and rate 0.5 draws the same tokens as the joined calls (the step, not the call,
    keys the draw)."""
    import comfy.model_management

    from sampling_helpers import record_chunks

    model = small_dit(kind)
    joined = sample_dit(csa(pack, model, rate=0.5, seed=4), 3, kind, cfg=3.0)
    monkeypatch.setattr(comfy.model_management, "get_free_memory", lambda *a, **k: 0)
    oracle = sample_dit(with_override(model, joint_oracle(text_tokens(kind), ALL, **nextdit_layout(kind))), 3,
                        kind, cfg=3.0)
    log = []
    got = sample_dit(record_chunks(csa(pack, model), log), 3, kind, cfg=3.0)
    torch.testing.assert_close(got, oracle, atol=1e-3, rtol=1e-3)  # float noise of other kernels: ~2.5e-4 on Z-Image
    assert (got - sample_dit(model, 3, kind, cfg=3.0)).abs().max() > 1e-2  # CSA acts far beyond the tolerance
    assert log and all(len(c) == 1 for c in log), log  # cond and uncond arrived in separate calls
    split = sample_dit(csa(pack, model, rate=0.5, seed=4), 3, kind, cfg=3.0)
    torch.testing.assert_close(split, joined, atol=1e-3, rtol=1e-3)
    assert (sample_dit(csa(pack, model, rate=0.5, seed=5), 3, kind, cfg=3.0) - joined).abs().max() > 1e-2  # draws act


def test_sliding_window_matches_the_oracle(host, pack):
    """tile_size 2 of 4 images: each image shares only with its window partner (the window centred on it,
    shifted inward at the ends), written here from the definition."""
    def window(i, b):  # 2 consecutive images: i with i + 1, the last one with the one before it
        return [i + 1] if i + 1 < b else [i - 1]
    model = small_dit("flux1")
    got = sample_dit(csa(pack, model, tile_size=2), 4, "flux1", cfg=3.0)
    close(got, sample_dit(with_override(model, joint_oracle(TEXT, ALL, partners=window)), 4, "flux1", cfg=3.0))
    assert (got - sample_dit(csa(pack, model), 4, "flux1", cfg=3.0)).abs().max() > 1e-3  # not all-to-all


def test_block_choice_patches_only_those_blocks(host, pack):
    """dit_blocks = single-stream: the double-stream block stays plain."""
    model = small_flux("flux1", depth=2, single=2)
    got = sample_dit(csa(pack, model, dit_blocks=("single",)), 2, "flux1", cfg=2.0)
    oracle = joint_oracle(TEXT, {("single", 0), ("single", 1)})
    close(got, sample_dit(with_override(model, oracle), 2, "flux1", cfg=2.0))


def test_qwen_image_single_stream_choice_is_its_later_half(host, pack):
    """Qwen-Image has only joint ("double") blocks: dit_blocks = single-stream patches the later half of them
    (an odd count: the middle block counts as early), double-stream the earlier half."""
    model = small_qwen_image(layers=3)
    for choice, blocks in ((("single",), {("double", 2)}), (("double",), {("double", 0), ("double", 1)})):
        got = sample_dit(csa(pack, model, dit_blocks=choice), 2, "qwen", cfg=2.0, size=5)
        close(got, sample_dit(with_override(model, joint_oracle(TEXT, blocks)), 2, "qwen", cfg=2.0, size=5))


@pytest.mark.parametrize("kind", ("flux1", "flux2", "qwen", "lumina2", "zimage"))
def test_one_image_and_rate_zero_are_the_unpatched_model(host, pack, kind):
    model = small_dit(kind)
    for b, rate in ((1, 1.0), (3, 0.0)):
        assert torch.equal(sample_dit(csa(pack, model, rate=rate), b, kind, cfg=2.0),
                           sample_dit(model, b, kind, cfg=2.0)), (b, rate)


def test_rate_half_is_the_oracle_on_the_same_draws(host, pack):
    """Rate 0.5: the oracle takes each image's extra tokens from the plan of the step (the UNet draw, keyed by
    seed, step, tokens and group size), so every step re-draws and both CFG halves and all blocks share it."""
    plan_for = pack("attention.context").plan_for

    def override(func, q, k, v, heads, *args, **kwargs):
        opts = kwargs["transformer_options"]
        rows, h, n, d = q.shape
        b = rows // len(opts["cond_or_uncond"])
        schedule = opts["sample_sigmas"].tolist()[:-1]
        step = min(range(len(schedule)), key=lambda i: abs(schedule[i] - float(opts["sigmas"][0])))
        idx = plan_for(7, step, n - TEXT, b, 0.5).all_idx
        flat = lambda t: t.transpose(0, 1).reshape(n, h * d)  # noqa: E731
        out = torch.empty(rows, n, h * d)
        for row in range(rows):
            chunk, i = divmod(row, b)
            pool_k = torch.cat([flat(k[chunk * b + j])[TEXT:] for j in range(b)])
            pool_v = torch.cat([flat(v[chunk * b + j])[TEXT:] for j in range(b)])
            out[row, :TEXT] = mha(flat(q[row])[:TEXT], flat(k[row]), flat(v[row]), h)
            out[row, TEXT:] = mha(flat(q[row])[TEXT:], torch.cat((flat(k[row]), pool_k[idx[i]])),
                                  torch.cat((flat(v[row]), pool_v[idx[i]])), h)
        return out

    model = small_flux("flux1")
    got = sample_dit(csa(pack, model, rate=0.5, seed=7), 3, "flux1", cfg=2.0, steps=3)
    close(got, sample_dit(with_override(model, override), 3, "flux1", cfg=2.0, steps=3))
    assert (got - sample_dit(csa(pack, model, rate=0.5, seed=8), 3, "flux1", cfg=2.0, steps=3)).abs().max() > 1e-4


def test_an_earlier_attention_override_still_runs(host, pack):
    """A model that already had an attention override keeps it: CSA calls it with the extended keys."""
    seen = []

    def counting(func, q, k, v, heads, *args, **kwargs):
        seen.append(k.shape[2])
        return func(q, k, v, heads, *args, **kwargs)

    model = with_override(small_flux("flux1"), counting)
    got = sample_dit(csa(pack, model), 2, "flux1")
    close(got, sample_dit(with_override(small_flux("flux1"), joint_oracle(TEXT, ALL)), 2, "flux1"))
    assert set(seen) == {TEXT + 9, TEXT + 9 + 9}  # text queries: own 6 + 3x3 tokens; image queries: + the other 9


def test_no_host_syncs_in_the_blocks(host, pack):
    """The patch reads the device once per model call (the sigma) and once per run (the schedule), never per
    block: the same added syncs per call with 2 or 6 patched blocks."""
    from host_syncs import HostSyncs

    def added(depth):
        model = small_flux("flux1", depth=depth, single=2 * depth)
        counts = []
        for m in (model, csa(pack, model, rate=0.5)):
            calls = []
            m = m.clone()
            m.set_model_unet_function_wrapper(lambda f, a: calls.append(1) or f(a["input"], a["timestep"], **a["c"]))
            with HostSyncs() as syncs:
                sample_dit(m, 2, "flux1", cfg=2.0)
            counts.append(syncs.count / len(calls))
        return counts[1] - counts[0]

    one, three = added(1), added(3)
    assert one == three == 1 + 1 / 2, (one, three)  # 2 calls (cfg 2, 2 steps): 1 sigma each, 1 schedule


def test_node_patches_single_stream_blocks_by_default(host, pack):
    import comfy.patcher_extension as ext

    node = pack("nodes.csa_nodes").ConsistentSelfAttention
    args = dict(sampling_rate_1_32=0.5, sampling_rate_1_16=0.5, sampling_rate_1_8=0.5, reference_count=0, seed=0,
                blocks="decoder", start_percent=0.0, end_percent=1.0, schedule="always", tile_size=0)
    for choice, layers in ((None, {"single.0", "single.1"}), ("all", {"double.0", "double.1", "single.0", "single.1"}),
                           ("double-stream", {"double.0", "double.1"})):
        extra = {} if choice is None else {"dit_blocks": choice}
        model = node.execute(small_flux("flux1", depth=2, single=2), **args, **extra).result[0]
        (spec,) = model.get_wrappers(ext.WrappersMP.APPLY_MODEL, "storydiffusion_native")
        assert set(spec.layers) == layers, choice
    for model in (small_qwen_image(layers=4), small_nextdit(layers=4)):  # one kind of block: the later half
        model = node.execute(model, **args).result[0]
        (spec,) = model.get_wrappers(ext.WrappersMP.APPLY_MODEL, "storydiffusion_native")
        assert set(spec.layers) == {"double.2", "double.3"}


@pytest.mark.parametrize("kind", NEXTDIT)
def test_nextdit_blocks_are_counted_and_its_refiners_left_alone(host, pack, kind):
    """NextDiT names no block on 0.3.75: its main blocks are its calls over the whole (padded) sequence, in order;
    the context refiner (text only) and noise refiner (image only) stay plain. dit_blocks picks the later half
    (single-stream) or the earlier half (double-stream) of 3 blocks."""
    model = small_nextdit(kind, layers=3)
    for choice, blocks in ((("single",), {("double", 2)}), (("double",), {("double", 0), ("double", 1)})):
        got = sample_dit(csa(pack, model, dit_blocks=choice), 2, kind, cfg=2.0)
        oracle = joint_oracle(text_tokens(kind), blocks, **nextdit_layout(kind, layers=3))
        close(got, sample_dit(with_override(model, oracle), 2, kind, cfg=2.0))


def test_text_padding_mask_of_current_comfyui_matches_the_oracle(host, pack):
    """Current ComfyUI's Qwen-Image masks padded text keys with an additive ``[rows, 1, text + image]`` mask
    (0.3.75 passes none). With two prompts of 2 and 5 real tokens, rate 1, two chunks: every query skips its own
    row's padding, image queries also see all image tokens of the other images of its chunk (never masked)."""
    from comfy.ldm.modules.attention import optimized_attention

    plan_for = pack("attention.context").plan_for
    joint = pack("attention.csa").joint_consistent_attention
    g, b, h, text, img, d = 2, 2, 2, 6, 9, 8
    n, rows = text + img, g * b
    q, k, v = (torch.randn(rows, h, n, d, generator=torch.Generator().manual_seed(s)) for s in (1, 2, 3))
    keep = torch.ones(rows, n, dtype=torch.bool)
    for row, real in enumerate((2, 5) * g):
        keep[row, real:text] = False
    mask = ((~keep).float() * -torch.finfo(torch.float32).max).unsqueeze(1)  # the model's [rows, 1, N]
    got = joint(q, k, v, plan_for(0, 0, img, b, 1.0), (text, n),
                lambda q, k, v, m: optimized_attention(q, k, v, h, m, skip_reshape=True), mask)
    flat = lambda t: t.transpose(0, 1).reshape(t.shape[1], h * d)  # noqa: E731
    for row in range(rows):
        chunk, i = divmod(row, b)
        own_k, own_v = flat(k[row])[keep[row]], flat(v[row])[keep[row]]
        others = [chunk * b + j for j in range(b) if j != i]
        kk = torch.cat([own_k] + [flat(k[r])[text:] for r in others])
        vv = torch.cat([own_v] + [flat(v[r])[text:] for r in others])
        close(got[row, :text], mha(flat(q[row])[:text], own_k, own_v, h))
        close(got[row, text:], mha(flat(q[row])[text:], kk, vv, h))


# SD3/SD3.5 (MMDiT, MMDiT-X) and HiDream: no block names, q/k/v as [rows, N, heads * D].
COUNTED = ("sd3", "sd35", "hidream")
LLAMA = 4  # HiDream's llama tokens per layer: its sequence is [image, T5 (TEXT), llama, llama]


def small_counted(kind, layers=2):
    return small_hidream(double=layers // 2, single=layers - layers // 2) if kind == "hidream" else \
        small_sd3(kind, layers=layers)


def sample_counted(model, b, kind, cfg=1.0, steps=2, seed=0, size=6):
    """Sample a ``b``-image batch of a small SD3 or HiDream with the stock sampler (``size``: latent side, or
    (height, width))."""
    import comfy.sample

    gen = torch.Generator().manual_seed(123)

    def extra(n):
        conds = {"pooled_output": torch.randn(n, 32, generator=gen)}
        if kind == "hidream":
            conds["conditioning_llama3"] = torch.randn(n, 2, LLAMA, 32, generator=gen)
        return conds
    positive = [[torch.randn(b, TEXT, 32, generator=gen), extra(b)]]
    negative = [[torch.randn(1, TEXT, 32, generator=gen), extra(1)]]
    latent = torch.zeros(b, 16, *((size, size) if isinstance(size, int) else size))
    noise = comfy.sample.prepare_noise(latent, seed)
    return comfy.sample.sample(model, noise, steps, cfg, "euler", "simple", positive, negative, latent, seed=seed,
                               disable_pbar=True)


def counted_oracle(kind, blocks=None, refs=0, layers=2, size=6):
    """Independent CSA at rate 1 for a model that names no block, written from its layout: SD3's calls per block
    are the joint call over [text, image] then (SD3.5's MMDiT-X, in the earlier half of the blocks) the attn2 call
    over the image alone, which gets the UNet semantics (all its queries are image queries); HiDream's are its
    double-, then single-stream blocks, each over [image, T5, llama, llama]. ``blocks``: the patched (block_type,
    index), None: all."""
    image = (size // 2) ** 2
    if kind == "hidream":
        span, order = (0, image), [("double", i) for i in range(layers // 2)] + \
            [("single", i) for i in range(layers - layers // 2)]
    else:
        span, order = (TEXT, TEXT + image), []
        for i in range(layers):
            order += [("double", i)] + ([("x_block", i)] if kind == "sd35" and i < (layers + 1) // 2 else [])
    joint = image + TEXT + (2 * LLAMA if kind == "hidream" else 0)
    calls = itertools.count()

    def override(func, q, k, v, heads, *args, **kwargs):
        n = q.shape[1]
        if n != joint and not (kind == "sd35" and n == image):
            return func(q, k, v, heads, *args, **kwargs)
        block = order[next(calls) % len(order)]
        if blocks is not None and block not in blocks:
            return func(q, k, v, heads, *args, **kwargs)
        q, k, v = (t.reshape(t.shape[0], n, heads, -1).transpose(1, 2) for t in (q, k, v))
        chunks = len(kwargs["transformer_options"]["cond_or_uncond"])
        return per_image(q, k, v, chunks, (0, n) if n == image else span, refs)
    return override


@pytest.mark.parametrize("kind", COUNTED)
def test_counted_families_rate_one_is_the_oracle(host, pack, kind):
    """SD3, SD3.5 (MMDiT-X: its attn2 too) and HiDream: rate 1, every block, CFG 3 (two chunks in one call): equal
    to the per-image oracle; and CSA is visible."""
    model = small_counted(kind)
    got = sample_counted(csa(pack, model), 3, kind, cfg=3.0)
    close(got, sample_counted(with_override(model, counted_oracle(kind)), 3, kind, cfg=3.0))
    assert (got - sample_counted(model, 3, kind, cfg=3.0)).abs().max() > 1e-3, "CSA changed nothing"


@pytest.mark.parametrize("kind", COUNTED)
def test_counted_families_reference_mode_with_cfg_one(host, pack, kind):
    """R = 2 references of 4 images, cfg 1 (one chunk): the references share among themselves, the others see
    the references' image tokens only."""
    model = small_counted(kind)
    got = sample_counted(csa(pack, model, refs=2), 4, kind)
    close(got, sample_counted(with_override(model, counted_oracle(kind, refs=2)), 4, kind))


@pytest.mark.parametrize("kind", COUNTED)
def test_counted_families_one_image_and_rate_zero_are_the_unpatched_model(host, pack, kind):
    model = small_counted(kind)
    for b, rate in ((1, 1.0), (3, 0.0)):
        assert torch.equal(sample_counted(csa(pack, model, rate=rate), b, kind, cfg=2.0),
                           sample_counted(model, b, kind, cfg=2.0)), (b, rate)


@pytest.mark.parametrize("kind, choices", [
    ("sd35", ((("single",), {("double", 2)}),
              (("double",), {("double", 0), ("double", 1), ("x_block", 0), ("x_block", 1)}))),
    ("hidream", ((("single",), {("single", 0), ("single", 1)}), (("double",), {("double", 0)}))),
])
def test_counted_families_block_choice(host, pack, kind, choices):
    """SD3 has one kind of joint block: dit_blocks = single-stream patches the later half (of 3: the last one),
    double-stream the earlier half with their MMDiT-X attn2; HiDream's double- and single-stream blocks are its
    own. The node's default is single-stream."""
    import comfy.patcher_extension as ext

    model = small_counted(kind, layers=3)
    for choice, blocks in choices:
        got = sample_counted(csa(pack, model, dit_blocks=choice), 2, kind, cfg=2.0)
        close(got, sample_counted(with_override(model, counted_oracle(kind, blocks, layers=3)), 2, kind, cfg=2.0))
    node = pack("nodes.csa_nodes").ConsistentSelfAttention
    patched = node.execute(model, sampling_rate_1_32=0.5, sampling_rate_1_16=0.5, sampling_rate_1_8=0.5,
                           reference_count=0, seed=0, blocks="decoder", start_percent=0.0, end_percent=1.0,
                           schedule="always", tile_size=0).result[0]
    (spec,) = patched.get_wrappers(ext.WrappersMP.APPLY_MODEL, "storydiffusion_native")
    assert set(spec.layers) == {f"{t}.{i}" for t, i in choices[0][1]}
