"""Character masks and subject-masked CSA on DiTs (issue 10) through ComfyUI's real sampler, on small real DiTs,
against oracles written here from the definitions.

Masks (attention/masks.py): in each recorded block (Flux.1: the double-stream blocks; SD3/SD3.5: the earlier half
of the joint blocks, MMDiT-X's image-only attention not counted), image i's image queries' attention probability
to each character's span tokens, softmax over the whole joint sequence of its own row, heads averaged; averaged
over the blocks of the last step, smoothed, normalised, on the row-major image-token grid.

Routing (attention/csa.py joint_consistent_attention): as the UNet's (test_subject_masks.py), in the joint
attention: text queries keep their own row; an image query keeps its own row and, of the other images' image
tokens, sees those in its routed character's region.
"""
import itertools
import math

import pytest
import torch

from models import small_flux, small_qwen_image, small_sd3
from sampling_helpers import close, mha
from test_character_masks import blur
from test_dit_csa import TEXT, csa, sample_counted, sample_dit, with_override
from test_subject_masks import NAMED, STORY, given_masks, label, parsed, regions_at

SPANS = ({"A": ((1, 3),), "B": ((4, 5), (5, 6))}, {"A": ((2, 4),)}, {})  # panel 3: [NC]
HW = (6, 8)  # latent: a 3 x 4 grid of image tokens (patch 2), row-major


def mask_story(pack):
    import dataclasses

    story = parsed(pack, "[A] a fox\n[B] a cat\n---\n[A] and [B] play\n[A] sleeps\n[NC] a forest\n")
    return dataclasses.replace(story, panels=tuple(dataclasses.replace(p, spans=s)
                                                   for p, s in zip(story.panels, SPANS)))


def span_oracle(blocks, joint=None, layers=None, then=None):
    """An attention override recording, in ``blocks``, per positive image and head, softmax(q k^T / sqrt(d)) of its
    image queries over ALL keys of its own row (text first, TEXT tokens), summed over each character's span
    columns, mean over heads; the last call of each block wins. ``joint``/``layers``: a model that names no block
    (SD3): its i-th call over ``joint`` tokens is block ("double", i mod layers). ``then``: an override to hand every
    call on to (else ComfyUI's function). Returns (override, the per-block maps)."""
    last, calls = {}, itertools.count()

    def override(func, q, k, v, heads, *args, **kwargs):
        opts = kwargs["transformer_options"]
        n = q.shape[1] if q.ndim == 3 else q.shape[2]
        block = (opts.get("block_type"), opts.get("block_index"))
        if joint is not None:
            block = ("double", next(calls) % layers) if n == joint else None
        if block in blocks:
            qh, kh = ((t.reshape(t.shape[0], n, heads, -1).transpose(1, 2) if t.ndim == 3 else t) for t in (q, k))
            d = qh.shape[-1]
            chunks = list(opts["cond_or_uncond"])
            b = q.shape[0] // len(chunks)
            maps = torch.zeros(b, n - TEXT, 2)
            for i in range(b):
                row = chunks.index(0) * b + i
                for h in range(heads):
                    p = torch.softmax(qh[row, h, TEXT:] @ kh[row, h].T / math.sqrt(d), dim=-1)
                    for c, name in enumerate("AB"):
                        for start, stop in SPANS[i].get(name, ()):
                            maps[i, :, c] += p[:, start:stop].sum(-1) / heads
            last[block] = maps
        if then is not None:
            return then(func, q, k, v, heads, *args, **kwargs)
        return func(q, k, v, heads, *args, **kwargs)
    return override, last


def processed(last, hw):
    """Mean over blocks, on the (h, w) grid, blurred, min-max per image and character (zeros when constant)."""
    p = torch.stack(list(last.values())).mean(0)
    p = p.reshape(p.shape[0], *hw, 2).permute(0, 3, 1, 2)
    out = torch.zeros_like(p)
    for i in range(p.shape[0]):
        for c in range(2):
            m = blur(p[i, c])
            if m.max() > m.min():
                out[i, c] = (m - m.min()) / (m.max() - m.min())
    return out


def masked(pack, model, story, given=None):
    return pack("attention.masks").apply_masks(model, story, given)


@pytest.mark.parametrize("kind", ("flux1", "sd3", "sd35"))
def test_masks_equal_the_span_probabilities_of_the_joint_attention(host, pack, kind):
    """The recorded masks equal the oracle's (cfg 3: the positive chunk of a two-chunk call), and recording leaves the
    sampled latents bit-equal."""
    if kind == "flux1":
        model, blocks, extra = small_flux("flux1", depth=2, single=1), {("double", 0), ("double", 1)}, {}
        sample = lambda m: sample_dit(m, 3, "flux1", cfg=3.0, size=HW)  # noqa: E731
    else:  # 3 joint blocks: the earlier half is blocks 0 and 1 (SD3.5: each with its image-only attention). Weights
        # of scale 1: at 0.2, SD3.5's normed q/k attend almost uniformly and min-max normalising a ~1e-3 range
        # would magnify float rounding past the tolerance.
        model, blocks = small_sd3(kind, layers=3, scale=1.0), {("double", 0), ("double", 1)}
        extra = {"joint": TEXT + 12, "layers": 3}
        sample = lambda m: sample_counted(m, 3, kind, cfg=3.0, size=HW)  # noqa: E731
    recording, recorder = masked(pack, model, mask_story(pack))
    latents = sample(recording)
    override, last = span_oracle(blocks, **extra)
    plain = sample(with_override(model, override))
    assert set(last) == blocks
    assert recorder.masks.shape == (3, 2, 3, 4) and recorder.latent_hw == HW and recorder.scale == 8
    torch.testing.assert_close(recorder.masks, processed(last, (3, 4)), atol=1e-5, rtol=1e-5)
    assert recorder.masks[0].amax() == 1.0 and recorder.masks[1, 1].abs().sum() == 0 and recorder.masks[2].sum() == 0
    assert torch.equal(latents, plain) and torch.equal(latents, sample(model))


def test_masks_and_csa_keep_each_other_in_either_order(host, pack):
    """CSA on every block (the recorded ones too) and masks, applied in either order: the same latents as CSA alone
    (recording changes nothing), the same masks, and those masks are the probabilities over each image's OWN joint
    sequence (the oracle recording above CSA's override), not over CSA's extended keys."""
    model = small_flux("flux1", depth=2, single=1)
    patch = pack("attention.patch")
    story = mask_story(pack)
    sample = lambda m: sample_dit(m, 3, "flux1", cfg=3.0, size=HW)  # noqa: E731
    alone = sample(csa(pack, model))
    first, rec_first = masked(pack, csa(pack, model), story)
    model_masks, rec_second = masked(pack, model, story)
    second = csa(pack, model_masks)
    assert torch.equal(sample(first), alone) and torch.equal(sample(second), alone)
    assert (alone - sample(model)).abs().max() > 1e-3  # CSA acts
    torch.testing.assert_close(rec_first.masks, rec_second.masks, atol=0, rtol=0)
    csa_model = csa(pack, model)
    override, last = span_oracle({("double", 0), ("double", 1)},
                                 then=csa_model.model_options["transformer_options"]["optimized_attention_override"])
    close(sample(with_override(csa_model, override)), alone)
    torch.testing.assert_close(rec_first.masks, processed(last, (3, 4)), atol=1e-5, rtol=1e-5)
    assert isinstance(patch.csa_settings_of(second), patch.CSASettings)


def routed_joint_oracle(blocks, soft, named, hw, refs=0):
    """Independent subject-masked CSA at rate 1 in the joint attention of ``blocks`` ([TEXT text, image] per row): a
    loop over rows and image queries building each query's keys token by token: its own row, plus, when it reads
    character c, the image tokens of its partners inside c's region."""
    def override(func, q, k, v, heads, *args, **kwargs):
        opts = kwargs["transformer_options"]
        if (opts.get("block_type"), opts.get("block_index")) not in blocks:
            return func(q, k, v, heads, *args, **kwargs)
        rows, h, n, d = q.shape
        b = rows // len(opts["cond_or_uncond"])
        member, value = regions_at(soft, named, n - TEXT, 0.5, hw)
        flat = lambda t: t.transpose(0, 1).reshape(n, h * d)  # noqa: E731  [h, n, d] -> [n, h*d]
        out = torch.empty(rows, n, h * d)
        for row in range(rows):
            chunk, i = divmod(row, b)
            partners = [j for j in range(b) if j != i and (refs == 0 or j < refs) and (i >= refs or j < refs)]
            out[row, :TEXT] = mha(flat(q[row])[:TEXT], flat(k[row]), flat(v[row]), h)
            for t in range(n - TEXT):
                c = label(i, t, named, member, value)
                keys, vals = [flat(k[row])], [flat(v[row])]
                for j in partners if c is not None else ():
                    keys.append(flat(k[chunk * b + j])[TEXT:][member[j, :, c]])
                    vals.append(flat(v[chunk * b + j])[TEXT:][member[j, :, c]])
                out[row, TEXT + t] = mha(flat(q[row])[TEXT + t:TEXT + t + 1], torch.cat(keys), torch.cat(vals), h)[0]
        return out
    return override


def subject_csa(pack, model, story, given, refs=0, rate=1.0):
    patch = pack("attention.patch")
    settings = patch.CSASettings(rates=((16, rate),), reference_count=refs, dit_blocks=("double", "single"),
                                 subject_masks=True)
    return masked(pack, patch.apply_csa(model, settings), story, given)[0]


@pytest.mark.parametrize("kind", ("flux1", "qwen"))
def test_given_masks_route_as_the_oracle(host, pack, kind):
    """Batch mode, rate 1, cfg 3, five panels (A, B, A and B, [NC], A), given masks: equal to the per-query oracle on
    Flux.1 (double- and single-stream blocks) and on Qwen-Image (joint blocks only, whose story encoder gives no
    spans: given masks); the masks act (whole-image CSA differs)."""
    model = small_flux("flux1") if kind == "flux1" else small_qwen_image(layers=2)
    blocks = {("double", 0), ("single", 0)} if kind == "flux1" else {("double", 0), ("double", 1)}
    soft = given_masks()
    got = sample_dit(subject_csa(pack, model, parsed(pack), soft), 5, kind, cfg=3.0, size=HW)
    expected = sample_dit(with_override(model, routed_joint_oracle(blocks, soft, NAMED, (3, 4))), 5, kind, cfg=3.0,
                          size=HW)
    close(got, expected)
    assert (got - sample_dit(csa(pack, model), 5, kind, cfg=3.0, size=HW)).abs().max() > 1e-3


def test_reference_mode_routes_as_the_oracle(host, pack):
    """Bank-free reference mode: two solo references (A, B) in front, then an A-and-B panel and an A panel; cfg 1."""
    story = parsed(pack, "[A] a fox\n[B] a cat\n---\n[A] runs\n[B] sleeps\n[A] and [B] play\n[A] eats\n")
    named, soft = ((0,), (1,), (0, 1), (0,)), given_masks(4)
    model = small_flux("flux1")
    got = sample_dit(subject_csa(pack, model, story, soft, refs=2), 4, "flux1", size=HW)
    oracle = routed_joint_oracle({("double", 0), ("single", 0)}, soft, named, (3, 4), refs=2)
    close(got, sample_dit(with_override(model, oracle), 4, "flux1", size=HW))


def test_rate_zero_and_one_image_are_the_unpatched_model(host, pack):
    model = small_flux("flux1")
    story = parsed(pack)
    assert torch.equal(sample_dit(subject_csa(pack, model, story, given_masks(), rate=0.0), 5, "flux1", cfg=2.0),
                       sample_dit(model, 5, "flux1", cfg=2.0))
    one = parsed(pack, "[A] a fox\n---\n[A] runs\n")
    assert torch.equal(sample_dit(subject_csa(pack, model, one, given_masks(1)[:, :1]), 1, "flux1", cfg=2.0),
                       sample_dit(model, 1, "flux1", cfg=2.0))


def test_no_host_syncs_in_the_blocks(host, pack):
    """Recording masks and routing by them read the device once per model call in each wrapper (the sigma) and
    once per run (the schedule; the masks moved to the CPU at the end), never per block: the same added syncs with
    2 or 4 blocks."""
    from host_syncs import HostSyncs

    def added(depth):
        model = small_flux("flux1", depth=depth, single=2 * depth)
        counts = []
        for m in (model, subject_csa(pack, model, mask_story(pack), None)):
            calls = []
            m = m.clone()
            m.set_model_unet_function_wrapper(lambda f, a: calls.append(1) or f(a["input"], a["timestep"], **a["c"]))
            with HostSyncs() as syncs:
                sample_dit(m, 3, "flux1", cfg=2.0)  # step 0 records, step 1 also routes
            counts.append(syncs.count / len(calls))
        return counts[1] - counts[0]

    one, two = added(1), added(2)
    assert one == two == 2 + 3 / 2, (one, two)  # 2 calls: a sigma read per wrapper; per run 2 schedules, 1 move


def test_families_without_spans_need_given_masks(host, pack):
    """Qwen-Image and Flux.2 (LLM text encoders: no token spans) take given masks only; Flux.2's latent is 1/16 of
    the image, so its mask images are 16 x the latent."""
    with pytest.raises(Exception, match="SDN_CharacterMasks: input 'masks': expected masks on Qwen-Image"):
        masked(pack, small_qwen_image(), mask_story(pack))
    with pytest.raises(Exception, match="SDN_CharacterMasks: input 'masks': expected masks on Flux.2"):
        masked(pack, small_flux("flux2"), mask_story(pack))
    model, recorder = masked(pack, small_flux("flux2"), mask_story(pack), given_masks(3))
    latent = sample_dit(model, 3, "flux2", size=HW)
    images = pack("nodes.mask_nodes").MaskImages.execute(recorder, {"samples": latent}).result[0]
    assert recorder.scale == 16 and images.shape == (6, 16 * 6, 16 * 8)
    torch.testing.assert_close(recorder.masks, given_masks(3))


def test_flux_nodes_through_the_executor(host, pack, flux_files):
    """Flux.1-dev through the stock UNETLoader (full width, one double and one single block), SDN_StoryPrompt's real
    T5 spans, CSA with subject_masks, Character Masks, the KSampler and Character Mask Images: masks at the image
    size, a row per panel and character, zeros where a panel does not name the character (CSA shares from the second
    step, by the first step's masks)."""
    story = "[A] a small orange fox\n[B] a grey cat\n---\n[A] and [B] play\n[A] sleeps\n[NC] a forest\n"
    csa_inputs = {"sampling_rate_1_32": 0.5, "sampling_rate_1_16": 1.0, "sampling_rate_1_8": 0.5,
                  "reference_count": 0, "seed": 0, "blocks": "decoder", "start_percent": 0.0, "end_percent": 1.0,
                  "schedule": "always", "tile_size": 0, "dit_blocks": "all", "subject_masks": True}
    sampler = {"seed": 0, "steps": 2, "cfg": 1.0, "sampler_name": "euler", "scheduler": "simple",
               "positive": ["3", 0], "negative": ["3", 1], "latent_image": ["6", 0], "denoise": 1.0}  # full width: 8 s a step
    prompt = {
        "1": {"class_type": "UNETLoader", "inputs": {"unet_name": flux_files["unet"], "weight_dtype": "default"}},
        "2": {"class_type": "SDNTest_TinyTextEncoders", "inputs": {"clip_name1": flux_files["clip_l"],
                                                                   "clip_name2": flux_files["t5xxl"], "type": "flux"}},
        "3": {"class_type": "SDN_StoryPrompt", "inputs": {"clip": ["2", 0], "story": story, "style": "none",
                                                          "negative": ""}},
        "4": {"class_type": "SDN_ConsistentSelfAttention", "inputs": {"model": ["1", 0], **csa_inputs}},
        "5": {"class_type": "SDN_CharacterMasks", "inputs": {"model": ["4", 0], "story": ["3", 4]}},
        "6": {"class_type": "EmptySD3LatentImage", "inputs": {"width": 64, "height": 48, "batch_size": ["3", 2]}},
        "7": {"class_type": "KSampler", "inputs": {"model": ["5", 0], **sampler}},
        "8": {"class_type": "SDN_CharacterMaskImages", "inputs": {"recorder": ["5", 1], "samples": ["7", 0]}},
        "9": {"class_type": "PreviewAny", "inputs": {"source": ["8", 1]}},
    }
    result = host.run(prompt)
    spans = [p.spans for p in result.node_output("3", 4).panels]
    assert set(spans[0]) == {"A", "B"} and set(spans[1]) == {"A"} and spans[2] == {}
    masks = result.node_output("8", 0)
    assert masks.shape == (6, 48, 64) and masks.dtype == torch.float32
    assert masks[0].amax() > 0.5 and masks[1].amax() > 0.5 and masks[2].amax() > 0.5
    assert masks[3].abs().sum() == 0 and masks[4:].abs().sum() == 0
