"""The shipped character-mask workflow two_characters_masks_sd15, executed end to end through ComfyUI's validator
and executor: every character's references in front of each batch (bank-free reference mode), Character Masks on
the CSA model, subject-masked CSA, the masks as images, comic pages.

The checkpoint loader is swapped for SDNTest_TinyCheckpoint and sizes, steps and pages are shrunk as in
test_bank_workflows.py; everything else is the shipped graph, run once with two comparison branches added on
the same batches (subject masks off; no CSA). Expectations (which panels are references, who each
panel names, batch contents) are written here from the story text, not taken from the code under test.
"""
import json

import torch

from test_bank_workflows import SIZE, WORKFLOWS, by_type, check_pages, items, prepare, shipped_story, titled

NAME = "two_characters_masks_sd15.json"
# Story panels (0-based): 0, 1 Mira alone, 2, 3 Otto alone (the references), 4 [NC], 5 Mira + Otto, 6 Otto,
# 7 Mira, 8 Mira + Otto, 9 [NC]. Each batch: the 4 references, then 3 panels.
BATCHES = [[0, 1, 2, 3, 4, 5, 6], [0, 1, 2, 3, 7, 8, 9]]
NAMES = ("Mira", "Otto")  # mask columns
NAMED = {0: {"Mira"}, 1: {"Mira"}, 2: {"Otto"}, 3: {"Otto"}, 4: set(), 5: {"Mira", "Otto"}, 6: {"Otto"},
         7: {"Mira"}, 8: {"Mira", "Otto"}, 9: set()}
NO_CHARACTER = {4, 9}


def test_shipped_story(pack):
    story = shipped_story(pack, json.loads((WORKFLOWS / NAME).read_text()))
    assert {p.index: set(p.characters) for p in story.panels} == NAMED
    assert {p.index for p in story.panels if p.no_character} == NO_CHARACTER


def with_branches(api):
    """The shipped graph plus two branches sampling the same batches: ``whole`` (CSA with subject_masks off) and
    ``plain`` (no CSA: Character Masks on the checkpoint's model), each ending in a PreviewAny so it runs."""
    (csa,) = by_type(api, "SDN_ConsistentSelfAttention")
    (masks,) = by_type(api, "SDN_CharacterMasks")
    (sampler,) = by_type(api, "KSampler")
    (loader,) = by_type(api, "SDNTest_TinyCheckpoint")
    api = dict(api)

    def copy(nid, **inputs):
        return {"class_type": api[nid]["class_type"], "inputs": {**api[nid]["inputs"], **inputs}}

    for branch, model in (("whole", ["whole_csa", 0]), ("plain", [loader, 0])):
        api[f"{branch}_masks"] = copy(masks, model=model)
        api[f"{branch}_sampler"] = copy(sampler, model=[f"{branch}_masks", 0])
        api[f"{branch}_out"] = {"class_type": "PreviewAny", "inputs": {"source": [f"{branch}_sampler", 0]}}
    api["whole_csa"] = copy(csa, subject_masks=False)
    return api


def latents(result, sampler):
    """The KSampler's latents, one tensor per batch."""
    return [latent["samples"] for latent in items(result, sampler, 0)]


def test_two_characters_masks_sd15(host, pack):
    wf, api = prepare(host, NAME, "sd15")
    (csa,) = by_type(api, "SDN_ConsistentSelfAttention")
    assert api[csa]["inputs"]["reference_count"] == 4 and api[csa]["inputs"]["subject_masks"] is True
    result = host.run(with_branches(api))

    (prompt,) = by_type(api, "SDN_StoryPrompt")
    story = result.node_output(prompt, 4)
    assert [p.index for p in result.node_output(titled(wf, "SDN_StoryPanels", "references"), 1).panels] == [0, 1, 2, 3]
    (batches,) = by_type(api, "SDN_StoryBatches")
    assert [[p.index for p in s.panels] for s in items(result, batches, 2)] == BATCHES
    (masks_node,) = by_type(api, "SDN_CharacterMasks")
    assert api[masks_node]["inputs"]["story"] == [batches, 2]  # each batch's own story

    # The masks: per batch, images x characters rows at the image size; nonzero exactly where a panel names the
    # character (both in a two-character panel, neither in an [NC] panel).
    (mask_images,) = by_type(api, "SDN_CharacterMaskImages")
    for indices, masks, labels in zip(BATCHES, items(result, mask_images, 0), items(result, mask_images, 1)):
        assert masks.shape == (len(indices) * len(NAMES), SIZE, SIZE)
        assert len(labels.split("\n")) == masks.shape[0]
        for i, panel in enumerate(indices):
            for c, name in enumerate(NAMES):
                mask = masks[i * len(NAMES) + c]
                assert (mask.amax() > 0.5) == (name in NAMED[panel]), (panel, name)
                assert mask.amin() >= 0 and mask.amax() <= 1
    (to_image,) = by_type(api, "MaskToImage")
    assert [tuple(im.shape) for im in items(result, to_image, 0)] == [(14, SIZE, SIZE, 3)] * 2

    (merge,) = by_type(api, "SDN_MergePanels")
    merged = result.node_output(merge, 0)
    (decode,) = by_type(api, "VAEDecode")
    first, second = items(result, decode, 0)
    assert merged.shape == (10, SIZE, SIZE, 3)
    for i, image in enumerate([*first, *second[4:]]):  # the references once (from the first batch), story order
        assert torch.equal(merged[i], image), f"panel {i} out of place"
    assert result.node_output(merge, 1).split("\n") == list(story.captions)
    check_pages(host, pack, result, api, 10)

    # The subject masks act: the same batches sampled without them differ, and an [NC] panel, which reads nothing
    # from the references with them, comes out as with no CSA at all, while every panel naming a character differs
    # from that (it reads its character's references). At 2 steps only the second step shares (the first has no
    # masks yet): seen here, whole vs masked >= 1.2e-4, character panels vs no CSA >= 6e-6, [NC] vs no CSA <= 3e-8.
    (sampler,) = by_type(api, "KSampler")
    for indices, got, whole, plain in zip(BATCHES, *(latents(result, k) for k in (sampler, "whole_sampler",
                                                                                  "plain_sampler"))):
        for i, panel in enumerate(indices):
            assert (got[i] - whole[i]).abs().amax() > 2e-5, panel
            if panel in NO_CHARACTER:
                torch.testing.assert_close(got[i], plain[i], rtol=0, atol=1e-6)
                assert (whole[i] - plain[i]).abs().amax() > 2e-5, panel  # without masks it reads the references
            else:
                assert (got[i] - plain[i]).abs().amax() > 3e-6, panel
