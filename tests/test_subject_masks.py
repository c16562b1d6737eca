"""Subject-masked CSA and multi-character routing (issue 10) on a small real SD1.5 UNet through ComfyUI's sampler,
against an oracle written here from the definition: per image and query region, the key set built token by token.

Definition (README, attention/regions.py): a token of image j is in character c's region when the mask, resized
to the layer's grid (bilinear), exceeds the threshold and j's panel names c. A one-character panel's queries all
read their character; in a panel naming several, a query reads the character whose region holds it (highest mask
value where regions overlap), or nothing outside every region; an [NC] panel reads nothing. A query keeps every
token of its own image and, of the other images' tokens its plan samples, sees those in its character's region.
"""
import dataclasses

import pytest
import torch
import torch.nn.functional as F

from sampling_helpers import close, csa_model, mha, sample

STORY = "[A] a fox\n[B] a cat\n---\n[A] runs\n[B] sleeps\n[A] and [B] play\n[NC] a forest\n[A] eats\n"
NAMED = ((0,), (1,), (0, 1), (), (0,))  # character columns per panel
SIZE = 8  # latent side: the output blocks' levels are 8x8, 4x4 and 2x2 tokens


def parsed(pack, text=STORY):
    return pack("story.parser").parse_story(text)


def given_masks(images=5, seed=3):
    """Blocky soft masks (panels, characters, 8, 8): distinct regions per panel and character."""
    g = torch.Generator().manual_seed(seed)
    m = torch.rand(images, 2, 4, 4, generator=g)
    return F.interpolate(m, size=(SIZE, SIZE), mode="nearest")


def regions_at(soft, named, n, threshold, hw=None):
    """(member (images, n, C) bool, value (images, n, C)) at a level of n tokens: a row-major ``hw`` grid, default
    square."""
    side = int(round(n ** 0.5))
    maps = F.interpolate(soft.float(), size=hw or (side, side), mode="bilinear", align_corners=False)
    maps = maps.flatten(2).transpose(1, 2).clone()
    for i, cols in enumerate(named):
        for c in range(maps.shape[2]):
            if c not in cols:
                maps[i, :, c] = 0
    return maps > threshold, maps


def label(i, t, named, member, value):
    cols = named[i]
    if len(cols) == 1:
        return cols[0]
    inside = [c for c in cols if member[i, t, c]]
    return max(inside, key=lambda c: value[i, t, c]) if inside else None


def routed_oracle(soft_of, named, threshold, refs=0):
    """attn1 replace: rate 1, each query's keys = own tokens + the partners' tokens in its character's region.
    ``soft_of(sigma)``: the soft masks the call uses (None: plain attention)."""
    def replace(q, k, v, extra):
        heads = extra["n_heads"]
        chunks = len(extra["cond_or_uncond"])
        b, n = q.shape[0] // chunks, q.shape[1]
        soft = soft_of(float(extra["sigmas"].max()))
        if soft is None:
            return torch.stack([mha(q[r], k[r], v[r], heads) for r in range(q.shape[0])])
        member, value = regions_at(soft, named, n, threshold)
        out = torch.empty_like(q)
        for ch in range(chunks):
            for i in range(b):
                row = ch * b + i
                partners = [j for j in range(b) if j != i and (refs == 0 or j < refs) and (i >= refs or j < refs)]
                for t in range(n):
                    c = label(i, t, named, member, value)
                    keys, vals = [k[row]], [v[row]]
                    if c is not None:
                        for j in partners:
                            inside = member[j, :, c]
                            keys.append(k[ch * b + j][inside])
                            vals.append(v[ch * b + j][inside])
                    out[row, t] = mha(q[row, t:t + 1], torch.cat(keys), torch.cat(vals), heads)[0]
        return out
    return replace


def with_replace(model, replace):
    m = model.clone()
    for number in range(12):
        for depth in range(10):
            m.set_model_attn1_replace(replace, "output", number, depth)
    return m


def subject_model(pack, model, story, rate=1.0, refs=0, given=None, threshold=0.5):
    patch, masks = pack("attention.patch"), pack("attention.masks")
    s = patch.CSASettings(rates=((8, rate), (16, rate), (32, rate)), reference_count=refs, subject_masks=True)
    masked, recorder = masks.apply_masks(patch.apply_csa(model, s), story, given, threshold)
    return masked, recorder


@pytest.mark.parametrize("kind", ["sd15", "sdxl"])
def test_given_masks_route_as_the_oracle(pack, request, kind):
    unet = request.getfixturevalue(kind)
    soft = given_masks()
    model, _ = subject_model(pack, unet, parsed(pack), given=soft)
    expected = sample(with_replace(unet, routed_oracle(lambda sigma: soft, NAMED, 0.5)), 5, size=SIZE, kind=kind)
    got = sample(model, 5, size=SIZE, kind=kind)
    close(got, expected)
    # the masks act: whole-image CSA and plain attention differ from it
    assert (got - sample(csa_model(pack, unet), 5, size=SIZE, kind=kind)).abs().max() > 1e-4
    assert (got - sample(unet, 5, size=SIZE, kind=kind)).abs().max() > 1e-4


def test_masks_applied_before_or_after_csa_are_the_same(pack, sd15):
    patch, masks = pack("attention.patch"), pack("attention.masks")
    soft = given_masks()
    s = patch.CSASettings(rates=((8, 1.0), (16, 1.0), (32, 1.0)), subject_masks=True)
    first = masks.apply_masks(patch.apply_csa(sd15, s), parsed(pack), soft)[0]
    second = patch.apply_csa(masks.apply_masks(sd15, parsed(pack), soft)[0], s)
    assert torch.equal(sample(first, 5, size=SIZE), sample(second, 5, size=SIZE))


def test_reference_mode_routes_as_the_oracle(pack, sd15):
    # bank-free reference mode: two solo references (A, B) in front, then a two-character panel and an [A] panel
    story = parsed(pack, "[A] a fox\n[B] a cat\n---\n[A] runs\n[B] sleeps\n[A] and [B] play\n[A] eats\n")
    named = ((0,), (1,), (0, 1), (0,))
    soft = given_masks(4)
    model, _ = subject_model(pack, sd15, story, refs=2, given=soft)
    expected = sample(with_replace(sd15, routed_oracle(lambda sigma: soft, named, 0.5, refs=2)), 4, size=SIZE)
    close(sample(model, 4, size=SIZE), expected)


def test_rate_half_keeps_the_sampled_tokens_inside_the_regions(pack, sd15):
    # rate 0.5: the extra keys are exactly the plan's sampled tokens that lie in the region (layer-level check on
    # the same plan the sampler draws, through csa.consistent_self_attention against a per-query loop)
    csa, regions, context = pack("attention.csa"), pack("attention.regions"), pack("attention.context")
    b, n, c, heads = 5, 16, 8, 2
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2 * b, n, c, generator=g) for _ in range(3))
    soft = given_masks()
    plan = context.plan_for(7, 1, n, b, 0.5)
    routing = regions.routing(soft, NAMED, (4, 4), 0.5)
    got = csa.consistent_self_attention(q, k, v, heads, plan, routing=routing)
    member, value = regions_at(soft, NAMED, n, 0.5)
    for row in range(2 * b):
        ch, i = divmod(row, b)
        for t in range(n):
            lab = label(i, t, NAMED, member, value)
            extra = [int(e) for e in plan.all_idx[i]
                     if lab is not None and member[int(e) // n, int(e) % n, lab]]
            kk = torch.cat((k[row], k[ch * b:(ch + 1) * b].reshape(-1, c)[extra]))
            vv = torch.cat((v[row], v[ch * b:(ch + 1) * b].reshape(-1, c)[extra]))
            close(got[row, t], mha(q[row, t:t + 1], kk, vv, heads)[0])
    assert not torch.allclose(got, csa.consistent_self_attention(q, k, v, heads, plan))


def test_derived_masks_use_the_previous_step(pack, sd15):
    # Without given masks, step t routes by the span attention maps of step t - 1 (step 0 shares nothing): the
    # oracle records those maps with its own attn2 replace and routes with them.
    from test_character_masks import SIXTEENTH, blur
    from comfy.ldm.modules.attention import optimized_attention

    spans = ({"A": ((1, 3),)}, {"B": ((1, 3),)}, {"A": ((1, 3),), "B": ((5, 7),)}, {}, {"A": ((1, 3),)})
    story = parsed(pack)
    story = dataclasses.replace(story, panels=tuple(dataclasses.replace(p, spans=s)
                                                    for p, s in zip(story.panels, spans)))
    maps = {}  # sigma -> {layer: (images, N, C)}

    def attn2(q, k, v, extra):
        heads = extra["n_heads"]
        d = q.shape[-1] // heads
        b = q.shape[0] // len(extra["cond_or_uncond"])
        row0 = list(extra["cond_or_uncond"]).index(0) * b
        out = torch.zeros(b, q.shape[1], 2)
        for i in range(b):
            for h in range(heads):
                p = torch.softmax(q[row0 + i, :, h * d:(h + 1) * d] @ k[row0 + i, :, h * d:(h + 1) * d].T / d ** 0.5, -1)
                for c, name in enumerate("AB"):
                    for a, z in spans[i].get(name, ()):
                        out[i, :, c] += p[:, a:z].sum(-1) / heads
        maps.setdefault(float(extra["sigmas"].max()), {})[(extra["block"], extra["block_index"])] = out
        return optimized_attention(q, k, v, heads)

    def soft_of(sigma):
        earlier = [s for s in maps if s > sigma + 1e-6]
        if not earlier:
            return None
        p = torch.stack(list(maps[min(earlier)].values())).mean(0).reshape(5, 4, 4, 2).permute(0, 3, 1, 2)
        out = torch.zeros_like(p)
        for i in range(5):
            for c in range(2):
                m = blur(p[i, c])
                if m.max() > m.min():
                    out[i, c] = (m - m.min()) / (m.max() - m.min())
        return out

    oracle = with_replace(sd15, routed_oracle(soft_of, NAMED, 0.5))
    for block in SIXTEENTH:
        oracle.set_model_attn2_replace(attn2, *block, 0)
    expected = sample(oracle, 5, size=SIZE, steps=3)
    model, recorder = subject_model(pack, sd15, story)
    close(sample(model, 5, size=SIZE, steps=3), expected)
    assert len(maps) == 3


def test_errors_name_the_node_and_input(pack, sd15):
    patch = pack("attention.patch")
    s = patch.CSASettings(subject_masks=True)
    with pytest.raises(Exception, match="SDN_ConsistentSelfAttention: input 'subject_masks'"):
        sample(patch.apply_csa(sd15, s), 5, size=SIZE)
    other = sd15.clone()
    other.set_model_attn1_replace(lambda q, k, v, extra: q, "output", 3, 0)
    with pytest.raises(Exception, match="subject_masks"):
        patch.apply_csa(other, s)


def test_no_host_syncs_in_the_layers(pack, sd15):
    # Routing is built once per level and step from device tensors: subject-masked CSA reads nothing back beyond
    # what whole-image CSA and the mask recording already do (the sigma once a call, the masks once a run).
    from host_syncs import syncs_per_call

    patch, masks = pack("attention.patch"), pack("attention.masks")
    story = parsed(pack)
    whole = masks.apply_masks(patch.apply_csa(sd15, patch.CSASettings()), story, given_masks())[0]
    masked = subject_model(pack, sd15, story, rate=0.5, given=given_masks())[0]
    count = lambda m: syncs_per_call(m, 5, kind="sd15", size=SIZE, steps=4)  # noqa: E731
    assert count(masked) == count(whole)
