"""Panel selection, conditioning slicing, batching and merging (story/select.py and the SDN_StoryPanels,
SDN_StoryBatches, SDN_MergePanels nodes).

Expectations are written from the story text by hand (which lines are references, which are not) and from
tensors whose rows encode their panel index, so a wrong row, order or index shows up as a wrong number.
"""
import pytest
import torch

STORY = """\
[Ann] a girl in a red coat
[Bob] a tall man with a hat
---
[Bob] and [Ann] at a market # 0
[NC] a foggy harbour # 1
[Ann] reading a letter # 2
[Bob] fixing a boat # 3
[Ann] running on the pier # 4
[Ann] and [Bob] on a ship # 5
[Bob] waving goodbye # 6
[Ann] asleep in a cabin # 7
[Bob] looking at the sea # 8
"""
# story lines of the panels above (1-based, comments count): panel i is on line 4 + i
ANN_SOLO = [2, 4, 7]
BOB_SOLO = [3, 6, 8]


@pytest.fixture(scope="module")
def sel(pack):
    return pack("story.select")


@pytest.fixture(scope="module")
def story(pack):
    return pack("story.parser").parse_story(STORY)


def per_panel_cond(n, tokens=77, dim=8, mask=True):
    """Conditioning whose row i is filled with i (cond, pooled and mask), plus a shared extra."""
    rows = torch.arange(n, dtype=torch.float32)
    extras = {"pooled_output": rows[:, None].repeat(1, 5), "shared": torch.ones(3, 2)}
    if mask:
        extras["attention_mask"] = rows[:, None].repeat(1, tokens).long()
    return [[rows[:, None, None].repeat(1, tokens, dim), extras]]


def rows_of(cond_entry):
    cond, extras = cond_entry
    ids = cond[:, 0, 0].long().tolist()
    assert extras["pooled_output"][:, 0].long().tolist() == ids
    if "attention_mask" in extras:
        assert extras["attention_mask"][:, 0].tolist() == ids
    assert torch.equal(extras["shared"], torch.ones(3, 2))  # not per panel: untouched
    return ids


# -- selection ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name,count,expected", [("Ann", 1, ANN_SOLO[:1]), ("Ann", 2, ANN_SOLO[:2]),
                                                 ("Bob", 3, BOB_SOLO), ("", 2, ANN_SOLO[:2])])
def test_references_are_first_solo_panels(sel, story, name, count, expected):
    positions, sub = sel.select_panels(story, "references", name, count)
    assert list(positions) == expected
    assert [p.index for p in sub.panels] == expected  # original indices kept
    assert [p.caption for p in sub.panels] == [str(i) for i in expected]
    assert sub.characters == story.characters and sub.style == story.style


@pytest.mark.parametrize("count", [1, 2])
def test_references_of_every_character(sel, story, count):
    # "*": every character's first `count` solo panels, in story order (one conditioning for bank-free batches)
    positions, sub = sel.select_panels(story, "references", " * ", count)
    expected = sorted(ANN_SOLO[:count] + BOB_SOLO[:count])
    assert list(positions) == expected and [p.index for p in sub.panels] == expected
    rest = sel.select_panels(story, "rest", "", count)[0]
    assert sorted(positions + rest) == list(range(9)) and not set(positions) & set(rest)  # the rest's complement


@pytest.mark.parametrize("count", [1, 2, 3])
def test_rest_excludes_references_of_every_character(sel, story, count):
    positions, sub = sel.select_panels(story, "rest", "Bob", count)  # character is ignored by rest
    refs = set(ANN_SOLO[:count]) | set(BOB_SOLO[:count])
    expected = [i for i in range(9) if i not in refs]
    assert list(positions) == expected and [p.index for p in sub.panels] == expected
    assert [p.line for p in sub.panels] == [4 + i for i in expected]


def test_all_and_selection_of_a_sub_story(sel, story):
    positions, sub = sel.select_panels(story, "all", "", 1)
    assert list(positions) == list(range(9))
    # selecting from a sub-story: positions are rows of that sub-story, indices stay the story's
    _, rest = sel.select_panels(story, "rest", "", 1)
    positions, again = sel.select_panels(rest, "all", "", 1)
    assert list(positions) == list(range(7)) and [p.index for p in again.panels] == [0, 1, 4, 5, 6, 7, 8]


def test_selection_errors(sel, story, pack):
    err = pack("errors").NodeInputError
    with pytest.raises(err, match="reference_count.*at least 4 panel.*Ann.*lines 6, 8, 11.*lines 4, 9"):
        sel.select_panels(story, "references", "Ann", 4)
    with pytest.raises(err, match=r"character.*Ann, Bob\), or \* for every character's.*'Zed'"):
        sel.select_panels(story, "references", "Zed", 1)
    with pytest.raises(err, match="reference_count"):
        sel.select_panels(story, "references", "Ann", 0)
    with pytest.raises(err, match="reference_count.*at least 4 panel.*Ann"):  # "*": the first one short
        sel.select_panels(story, "references", "*", 4)
    with pytest.raises(err, match="part"):
        sel.select_panels(story, "middle", "Ann", 1)
    only_refs = pack("story.parser").parse_story("[Ann] a girl\n---\n[Ann] walks\n[Ann] runs")
    with pytest.raises(err, match="no panels left|panels left"):
        sel.select_panels(only_refs, "rest", "", 2)


# -- conditioning -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("mask", [True, False])
def test_slice_conditioning_rows_pooled_and_mask(sel, mask):
    cond = per_panel_cond(9, mask=mask)
    before = cond[0][0].clone()
    out = sel.slice_conditioning(cond, [2, 4, 7], 9, "X")
    assert rows_of(out[0]) == [2, 4, 7]
    assert out[0][0].shape == (3, 77, 8)
    assert torch.equal(cond[0][0], before) and cond[0][1]["pooled_output"].shape[0] == 9  # input untouched


def test_slice_conditioning_batch_one_and_mismatch(sel, pack):
    shared = [[torch.randn(1, 77, 8), {"pooled_output": torch.randn(1, 5)}]]
    out = sel.slice_conditioning(shared, [1, 3], 9, "X")
    assert torch.equal(out[0][0], shared[0][0])  # one prompt for every panel: kept
    with pytest.raises(pack("errors").NodeInputError, match="9 panels.*got 5 rows"):
        sel.slice_conditioning(per_panel_cond(5), [0], 9, "X")


# -- batching -----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("count,size,expected", [(7, 3, [3, 3, 1]), (6, 3, [3, 3]), (2, 4, [2]), (5, 1, [1] * 5)])
def test_split_batches(sel, count, size, expected):
    batches = sel.split_batches(count, size)
    assert [len(b) for b in batches] == expected
    assert [i for b in batches for i in b] == list(range(count))


def test_story_batches_node(pack, story):
    nodes = pack("nodes.story_nodes")
    _, rest = pack("story.select").select_panels(story, "rest", "", 1)
    cond = pack("story.select").slice_conditioning(per_panel_cond(9), range(9), 9, "X")
    cond = pack("story.select").slice_conditioning(cond, [p.index for p in rest.panels], 9, "X")
    out = nodes.StoryBatches.execute(cond, rest, 3, 96, 64)
    conds, latents, stories, counts = out.result
    assert counts == [3, 3, 1]
    indices = [[p.index for p in s.panels] for s in stories]
    assert indices == [[0, 1, 4], [5, 6, 7], [8]]
    assert [rows_of(c[0]) for c in conds] == indices
    assert [tuple(l["samples"].shape) for l in latents] == [(3, 4, 8, 12), (3, 4, 8, 12), (1, 4, 8, 12)]
    assert all(not l["samples"].any() for l in latents)
    assert all(set(l) == {"samples"} for l in latents)
    with pytest.raises(pack("errors").NodeInputError, match="at least one panel"):
        nodes.StoryBatches.execute(cond, pack("story.select").sub_story(rest, []), 3, 96, 64)


def test_story_batches_reference_mode(pack, story):
    """Bank-free reference mode: the reference panels' rows, panels and noise indices in front of every batch."""
    nodes, sel = pack("nodes.story_nodes"), pack("story.select")
    err = pack("errors").NodeInputError
    full = sel.slice_conditioning(per_panel_cond(9), range(9), 9, "X")
    ref_pos, refs = sel.select_panels(story, "references", "Ann", 2)
    rest_pos, rest = sel.select_panels(story, "rest", "", 2)
    ref_cond, rest_cond = (sel.slice_conditioning(full, pos, 9, "X") for pos in (ref_pos, rest_pos))
    out = nodes.StoryBatches.execute(rest_cond, rest, 3, 96, 64, reference_positive=ref_cond, reference_story=refs)
    conds, latents, stories, counts = out.result
    assert [p.index for p in refs.panels] == [2, 4]
    panels = [[p.index for p in s.panels] for s in stories]
    assert panels == [[2, 4, 0, 1, 5], [2, 4, 7, 8]]  # rest: not a reference of Ann (2, 4) or Bob (3, 6)
    assert [rows_of(c[0]) for c in conds] == panels
    assert counts == [5, 4] and all(s.carried == 2 for s in stories)
    # noise: the references 0..1 in every batch, panel p of the rest story at 2 + p
    assert [l["batch_index"] for l in latents] == [[0, 1, 2, 3, 4], [0, 1, 5, 6]]
    assert [tuple(l["samples"].shape) for l in latents] == [(5, 4, 8, 12), (4, 4, 8, 12)]
    # Merge Panels keeps each reference once and every panel in story order
    images = [coded_images(p) for p in panels]
    merged, captions, count = nodes.MergePanels.execute(images, stories).result
    drawn = [0, 1, 2, 4, 5, 7, 8]
    assert count == 7 and captions.split("\n") == [str(i) for i in drawn]
    assert (merged[:, 0, 0, 0] * 100).round().long().tolist() == drawn
    # the references drawn elsewhere too (images_2): those are kept, the carried copies dropped
    merged, _, count = nodes.MergePanels.execute(images, stories, images_2=[coded_images([2, 4]) * 0 + 0.5],
                                                 story_2=[refs]).result
    assert count == 7 and merged[[2, 3], 0, 0, 0].tolist() == [0.5, 0.5]
    with pytest.raises(err, match="reference_story.*a connection"):
        nodes.StoryBatches.execute(rest_cond, rest, 3, 96, 64, reference_positive=ref_cond)
    with pytest.raises(err, match="reference_positive.*token count.*got \\(70, 8\\)"):
        nodes.StoryBatches.execute(rest_cond, rest, 3, 96, 64, reference_positive=[[c[:, :70], e] for c, e in ref_cond],
                                   reference_story=refs)
    # one prompt for every panel (batch-1 entries) still gives one row per image
    one = [[torch.full((1, 77, 8), 7.0), {"pooled_output": torch.full((1, 5), 7.0), "shared": torch.ones(3, 2),
                                          "attention_mask": torch.full((1, 77), 7)}]]
    conds = nodes.StoryBatches.execute(one, rest, 3, 96, 64, reference_positive=ref_cond, reference_story=refs).result[0]
    assert [rows_of(c[0]) for c in conds] == [[2, 4, 7, 7, 7], [2, 4, 7, 7]]
    with pytest.raises(err, match="reference_positive.*2 panels.*got 9 rows"):
        nodes.StoryBatches.execute(rest_cond, rest, 3, 96, 64, reference_positive=full, reference_story=refs)


def test_story_batches_latent_template(pack, story):
    """An empty latent (e.g. Flux's 16 channels) sets every batch's channels and size; width/height are ignored."""
    nodes = pack("nodes.story_nodes")
    cond = per_panel_cond(9)
    template = {"samples": torch.zeros(1, 16, 5, 7), "batch_index": [3], "downscale_ratio_spacial": 8}
    _, latents, _, _ = nodes.StoryBatches.execute(cond, story, 4, 96, 64, empty_latent=template).result
    assert [tuple(l["samples"].shape) for l in latents] == [(4, 16, 5, 7), (4, 16, 5, 7), (1, 16, 5, 7)]
    assert all(set(l) == {"samples", "downscale_ratio_spacial"} for l in latents)
    with pytest.raises(pack("errors").NodeInputError, match="empty_latent.*samples tensor"):
        nodes.StoryBatches.execute(cond, story, 4, 96, 64, empty_latent={"samples": torch.zeros(4, 8)})


# -- merging ------------------------------------------------------------------------------------------------

def coded_images(indices, h=8, w=6):
    """IMAGE batch whose image k has every pixel equal to indices[k] / 100."""
    return torch.tensor(indices, dtype=torch.float32)[:, None, None, None].expand(-1, h, w, 3) / 100


def test_merge_order_and_errors(sel, story, pack):
    err = pack("errors").NodeInputError
    sub = sel.sub_story
    groups = [("a", coded_images([8, 3]), sub(story, [story.panels[8], story.panels[3]])),
              ("b", coded_images([0, 5]), sub(story, [story.panels[0], story.panels[5]])),
              ("c", coded_images([2]), sub(story, [story.panels[2]]))]
    images, panels = sel.merge_panels(groups)
    assert [p.index for p in panels] == [0, 2, 3, 5, 8]
    assert (images[:, 0, 0, 0] * 100).round().long().tolist() == [0, 2, 3, 5, 8]
    with pytest.raises(err, match="panel 4 .*line 7.* in both a and d"):
        sel.merge_panels(groups + [("d", coded_images([3]), sub(story, [story.panels[3]]))])
    with pytest.raises(err, match="2 panels.*got 3 images"):
        sel.merge_panels([("a", coded_images([8, 3, 1]), sub(story, [story.panels[8], story.panels[3]]))])
    with pytest.raises(err, match="6x8 px.*got 7x8 px"):
        sel.merge_panels(groups + [("d", coded_images([1], w=7), sub(story, [story.panels[1]]))])


def test_merge_node_lists_and_pairs(pack, story):
    nodes = pack("nodes.story_nodes")
    sub = pack("story.select").sub_story
    err = pack("errors").NodeInputError
    imgs = [coded_images([1, 4]), coded_images([6])]
    stories = [sub(story, [story.panels[1], story.panels[4]]), sub(story, [story.panels[6]])]
    out = nodes.MergePanels.execute(imgs, stories, images_2=[coded_images([0])], story_2=[sub(story, story.panels[:1])])
    images, captions, count = out.result
    assert count == 4 and captions.split("\n") == ["0", "1", "4", "6"]
    assert (images[:, 0, 0, 0] * 100).round().long().tolist() == [0, 1, 4, 6]
    with pytest.raises(err, match="story_2"):
        nodes.MergePanels.execute(imgs, stories, images_2=[coded_images([0])])
    with pytest.raises(err, match="one story item per images item"):
        nodes.MergePanels.execute(imgs, stories[:1])


# -- through ComfyUI's executor (list outputs, is_input_list, widget/link plumbing) ----------------------------

def test_panels_batches_merge_through_host(host):
    """StoryPrompt -> StoryPanels (references / rest) -> StoryBatches -> EmptyImage per batch -> MergePanels.

    EmptyImage runs once per batch (ComfyUI list processing), MergePanels receives every batch at once.
    """
    story = ("[Ann] a girl\n---\n[NC] a sea # s0\n[Ann] a boat # s1\n[Ann] a dog # s2\n[Ann] a cat # s3\n"
             "[NC] a sky # s4")
    prompt = {
        "ck": {"class_type": "SDNTest_TinyCheckpoint", "inputs": {"kind": "sd15", "seed": 0}},
        "sp": {"class_type": "SDN_StoryPrompt", "inputs": {"clip": ["ck", 1], "story": story, "style": "none",
                                                            "negative": ""}},
        "ref": {"class_type": "SDN_StoryPanels", "inputs": {"positive": ["sp", 0], "story": ["sp", 4],
                                                            "part": "references", "character": "Ann",
                                                            "reference_count": 1}},
        "rest": {"class_type": "SDN_StoryPanels", "inputs": {"positive": ["sp", 0], "story": ["sp", 4],
                                                             "part": "rest", "character": "", "reference_count": 1}},
        "bt": {"class_type": "SDN_StoryBatches", "inputs": {"positive": ["rest", 0], "story": ["rest", 1],
                                                            "batch_size": 3, "width": 64, "height": 32}},
        "im": {"class_type": "EmptyImage", "inputs": {"width": 16, "height": 8, "batch_size": ["bt", 3], "color": 0}},
        "ri": {"class_type": "EmptyImage", "inputs": {"width": 16, "height": 8, "batch_size": ["ref", 2],
                                                      "color": 0xFFFFFF}},
        "mg": {"class_type": "SDN_MergePanels", "inputs": {"images": ["im", 0], "story": ["bt", 2],
                                                           "images_2": ["ri", 0], "story_2": ["ref", 1]}},
        "out": {"class_type": "PreviewImage", "inputs": {"images": ["mg", 0]}},
    }
    result = host.run(prompt)
    full = result.node_output("sp", 0)
    ref_cond = result.node_output("ref", 0)
    assert torch.equal(ref_cond[0][0], full[0][0][1:2])
    assert result.node_output("ref", 3) == "s1"
    batches = result.node_items("bt")  # list outputs: every item
    assert batches[3] == [3, 1]
    assert [[p.index for p in s.panels] for s in batches[2]] == [[0, 2, 3], [4]]
    assert [tuple(l["samples"].shape) for l in batches[1]] == [(3, 4, 4, 8), (1, 4, 4, 8)]
    assert torch.equal(batches[0][1][0][0], full[0][0][4:5])
    images = result.node_output("mg", 0)
    assert images.shape == (5, 8, 16, 3)
    # the reference (panel 1) is the white image: merged back into second place
    assert images[:, 0, 0, 0].tolist() == [0.0, 1.0, 0.0, 0.0, 0.0]
    assert result.node_output("mg", 1) == "s0\ns1\ns2\ns3\ns4"
    assert result.node_output("mg", 2) == 5
