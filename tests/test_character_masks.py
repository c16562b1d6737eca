"""Character masks from cross-attention (attention/masks.py, nodes/mask_nodes.py) on a small real SD1.5 UNet
through ComfyUI's sampler: the recorded masks equal an independent computation of the span tokens' attention
probabilities, the sampled latents are untouched, panels without the character give zero rows, and the nodes'
outputs have the documented shapes through the executor."""
import dataclasses
import math

import pytest
import torch

from models import small_unet
from sampling_helpers import sample

# SD1.5's attn2 blocks at 1/16 of the image, read off the architecture (input 4, 5; output 6, 7, 8)
SIXTEENTH = [("input", 4), ("input", 5), ("output", 6), ("output", 7), ("output", 8)]
SPANS = ({"A": ((3, 7),), "B": ((10, 12), (20, 22))}, {"A": ((5, 9),)}, {})  # panel 3: [NC]


@pytest.fixture(scope="module")
def sd15(host):
    return small_unet("sd15", scale=0.2)


def story(pack):
    parser = pack("story.parser")
    parsed = parser.parse_story("[A] a fox\n[B] a cat\n---\n[A] and [B] play\n[A] sleeps\n[NC] a forest\n")
    panels = tuple(dataclasses.replace(p, spans=s) for p, s in zip(parsed.panels, SPANS))
    return dataclasses.replace(parsed, panels=panels)


def oracle_masks(model, steps=2):
    """Sample with an attn2 replace written here: per positive image and head, softmax(q k^T / sqrt(d)) over all
    77 text tokens, summed over each character's span columns, mean over heads; the last call of each 1/16 layer
    (the last step); mean over layers, a 3x3 binomial blur, min-max per image and character (zeros for an absent
    character)."""
    from comfy.ldm.modules.attention import optimized_attention

    last = {}

    def replace(q, k, v, extra):
        heads = extra["n_heads"]
        d = q.shape[-1] // heads
        b = q.shape[0] // len(extra["cond_or_uncond"])
        g = list(extra["cond_or_uncond"]).index(0)
        per_image = []
        for i in range(b):
            row = g * b + i
            maps = torch.zeros(q.shape[1], 2)
            for h in range(heads):
                qh, kh = q[row, :, h * d:(h + 1) * d], k[row, :, h * d:(h + 1) * d]
                p = torch.softmax(qh @ kh.T / math.sqrt(d), dim=-1)
                for c, name in enumerate("AB"):
                    for start, stop in SPANS[i].get(name, ()):
                        maps[:, c] += p[:, start:stop].sum(-1) / heads
            per_image.append(maps)
        last[(extra["block"], extra["block_index"])] = torch.stack(per_image)
        return optimized_attention(q, k, v, heads)

    m = model.clone()
    for block in SIXTEENTH:
        m.set_model_attn2_replace(replace, *block, 0)
    latents = sample(m, 3, steps=steps, size=8)
    p = torch.stack(list(last.values())).mean(0).reshape(3, 4, 4, 2).permute(0, 3, 1, 2)
    out = torch.zeros_like(p)
    for i in range(p.shape[0]):
        for c in range(2):
            blurred = blur(p[i, c])
            lo, hi = blurred.min(), blurred.max()
            if hi > lo:
                out[i, c] = (blurred - lo) / (hi - lo)
    assert len(last) == len(SIXTEENTH)
    return out, latents


def blur(m):
    """3x3 binomial smoothing ([1, 2, 1] / 4 per axis), edge pixels repeated, one pixel at a time."""
    h, w = m.shape
    weight = (0.25, 0.5, 0.25)
    out = torch.zeros_like(m)
    for y in range(h):
        for x in range(w):
            out[y, x] = sum(weight[dy + 1] * weight[dx + 1] * m[min(max(y + dy, 0), h - 1), min(max(x + dx, 0), w - 1)]
                            for dy in (-1, 0, 1) for dx in (-1, 0, 1))
    return out


def test_masks_equal_the_span_attention_probabilities(pack, sd15):
    masks = pack("attention.masks")
    model, recorder = masks.apply_masks(sd15, story(pack))
    latents = sample(model, 3, size=8)
    assert recorder.masks.shape == (3, 2, 4, 4) and recorder.latent_hw == (8, 8)  # 1/16 level: latent / 2
    expected, plain = oracle_masks(sd15)
    torch.testing.assert_close(recorder.masks, expected, atol=1e-5, rtol=1e-5)
    assert recorder.masks[0].amax() == 1.0 and recorder.masks[0].amin() == 0.0
    assert torch.equal(latents, plain)


def test_output_unchanged_and_chained(pack, sd15):
    # Bit-equal latents without and with the recorder, also on top of another attn2 replace (chained, kept).
    masks = pack("attention.masks")
    assert torch.equal(sample(masks.apply_masks(sd15, story(pack))[0], 3, size=8), sample(sd15, 3, size=8))
    calls = []

    def other(q, k, v, extra):
        calls.append(extra["block"])
        return torch.zeros_like(q)
    other_model = sd15.clone()
    for block in SIXTEENTH:
        other_model.set_model_attn2_replace(other, *block, 0)
    reference = sample(other_model, 3, size=8)
    n = len(calls)
    assert torch.equal(sample(masks.apply_masks(other_model, story(pack))[0], 3, size=8), reference)
    assert len(calls) == 2 * n


def test_no_host_syncs_in_attention_calls(pack, sd15):
    # Per model call only the wrapper's one read of the sigma (as CSA's); per run the schedule is read once and
    # the masks move to the CPU once: over 4 calls, 1 + 2 / 4 extra syncs a call.
    from host_syncs import syncs_per_call

    masked = pack("attention.masks").apply_masks(sd15, story(pack))[0]
    extra = syncs_per_call(masked, 3, kind="sd15", size=8, steps=4) - syncs_per_call(sd15, 3, kind="sd15", size=8,
                                                                                      steps=4)
    assert extra == 1.5


def test_absent_character_gives_a_zero_row(pack, sd15):
    masks = pack("attention.masks")
    model, recorder = masks.apply_masks(sd15, story(pack))
    sample(model, 3, size=8)
    m = recorder.masks
    assert m[1, 1].abs().sum() == 0 and m[2].abs().sum() == 0  # panel 2 has no B; panel 3 is [NC]
    assert m[1, 0].amax() == 1.0
    stacked = recorder.stacked((32, 32))
    assert stacked.shape == (6, 32, 32) and recorder.labels()[3] == "3: panel 2, B"


def test_mask_nodes_through_the_executor(host):
    story_text = "[A] a small orange fox\n[B] a grey cat\n---\n[A] and [B] play\n[A] sleeps\n[NC] a forest\n"
    prompt = {
        "1": {"class_type": "SDNTest_TinyCheckpoint", "inputs": {"kind": "sd15", "seed": 0}},
        "2": {"class_type": "SDN_StoryPrompt", "inputs": {"clip": ["1", 1], "story": story_text, "style": "none",
                                                          "negative": ""}},
        "3": {"class_type": "SDN_CharacterMasks", "inputs": {"model": ["1", 0], "story": ["2", 4]}},
        "4": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 48, "batch_size": ["2", 2]}},
        "5": {"class_type": "KSampler", "inputs": {"model": ["3", 0], "seed": 0, "steps": 2, "cfg": 5.0,
                                                   "sampler_name": "euler", "scheduler": "normal", "positive": ["2", 0],
                                                   "negative": ["2", 1], "latent_image": ["4", 0], "denoise": 1.0}},
        "6": {"class_type": "SDN_CharacterMaskImages", "inputs": {"recorder": ["3", 1], "samples": ["5", 0]}},
        "7": {"class_type": "PreviewAny", "inputs": {"source": ["6", 1]}},
    }
    result = host.run(prompt)
    masks, labels = result.node_output("6", 0), result.node_output("6", 1)
    assert masks.shape == (6, 48, 64) and masks.dtype == torch.float32
    assert labels.splitlines() == ["0: panel 1, A", "1: panel 1, B", "2: panel 2, A", "3: panel 2, B",
                                   "4: panel 3, A", "5: panel 3, B"]
    assert masks[0].amax() > 0.5 and masks[3].abs().sum() == 0 and masks[4:].abs().sum() == 0
