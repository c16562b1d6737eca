"""The shipped reference-mode workflows (character banks), executed end to end through ComfyUI's validator and
executor: long_story_sd15, two_characters_sd15, photo_reference_sdxl.

The checkpoint loader is swapped for SDNTest_TinyCheckpoint (real block layouts with small widths, real CLIP
and VAE architectures, random weights); sizes, steps and pages are shrunk for the CPU, and the SDXL story
is shortened (CLIP-G is slow on a CPU). Everything else is the shipped graph. Expectations (which panels are
references, which panel names which character, story order) are written here from the story text, not taken
from the code under test.
"""
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from checkpoints import install_random_weights
from PIL import Image

WORKFLOWS = Path(__file__).resolve().parent.parent / "workflows"
NAMES = ["long_story_sd15.json", "two_characters_sd15.json", "photo_reference_sdxl.json"]
SIZE, STEPS, PAGE = 64, 2, 256


def load_api(host, name):
    import sdn_host

    wf = json.loads((WORKFLOWS / name).read_text())
    return wf, sdn_host.ui_to_api(wf, host.nodes.NODE_CLASS_MAPPINGS)


def by_type(api, ctype):
    return sorted((k for k, v in api.items() if v["class_type"] == ctype), key=int)


def titled(wf, ctype, words):
    """Id (str) of the node of type ``ctype`` whose title contains ``words``."""
    (nid,) = [str(n["id"]) for n in wf["nodes"] if n["type"] == ctype and words in n.get("title", "")]
    return nid


def prepare(host, name, kind):
    wf, api = load_api(host, name)
    (loader,) = by_type(api, "CheckpointLoaderSimple")
    api[loader] = {"class_type": "SDNTest_TinyCheckpoint", "inputs": {"kind": kind, "seed": 0}}
    return wf, shrink(api)


def shrink(api, steps=STEPS):
    """Every latent source at SIZE px, every KSampler at ``steps``, the comic pages at PAGE px (for the CPU)."""
    for kind in ("EmptyLatentImage", "EmptySD3LatentImage", "SDN_StoryBatches"):
        for nid in by_type(api, kind):
            api[nid]["inputs"].update(width=SIZE, height=SIZE)
    for nid in by_type(api, "KSampler"):
        api[nid]["inputs"]["steps"] = steps
    (layout,) = by_type(api, "SDN_ComicLayout")
    api[layout]["inputs"].update(page_width=PAGE, page_height=PAGE)
    return api


def stock_model_files(api, files):
    """The stock UNETLoader and VAELoader of a DiT graph read the test's files (``files["unet"]``, ``["vae"]``)."""
    (unet,) = by_type(api, "UNETLoader")
    api[unet]["inputs"]["unet_name"] = files["unet"]
    (vae,) = by_type(api, "VAELoader")
    api[vae]["inputs"]["vae_name"] = files["vae"]
    return api


def items(result, nid, index):
    """Every item of an output (list outputs and nodes run once per list item give several)."""
    return result.node_items(nid)[index]


def routing_of(model):
    """(bank names, routing) of a model patched by SDN_ReadCharacterBanks, read from its attn1 patches."""
    layers = model.model_options["transformer_options"]["patches_replace"]["attn1"].values()
    readers = {id(l.reader): l.reader for l in layers if getattr(l, "reader", None) is not None}
    assert len(readers) == 1
    (reader,) = readers.values()
    return [b.name for b in reader.banks], reader.routing


def check_pages(host, pack, result, api, panels):
    (save,) = by_type(api, "SaveImage")
    images = result.outputs[save]["images"]
    (layout,) = by_type(api, "SDN_ComicLayout")
    inputs = api[layout]["inputs"]
    lay = pack("story.layout")
    spec = lay.LayoutSpec(layout=inputs["layout"], reading_direction=inputs["reading_direction"],
                          page_width=PAGE, page_height=PAGE, rows=inputs["rows"], columns=inputs["columns"],
                          gutter=inputs["gutter"], border_width=inputs["border_width"])
    per_page = len(lay.cell_boxes(spec))
    assert len(images) == -(-panels // per_page)
    for item in images:
        img = np.asarray(Image.open(host.base_directory / "output" / item["subfolder"] / item["filename"]).convert("RGB"))
        assert img.shape == (PAGE, PAGE, 3) and img.std() > 5


def check_bank(host, result, bank_node, save_node, name, references):
    bank = result.node_output(bank_node, 0)
    assert bank.name == name and bank.reference_count == references
    assert bank.latent_hw == (SIZE // 8, SIZE // 8)
    assert {key[0] for key in bank.entries} == set(range(STEPS))  # every step recorded
    assert {key[2] for key in bank.entries} == {0, 1}  # both CFG halves
    path = Path(result.node_output(save_node, 0))
    assert path.is_file() and path.parent == host.base_directory / "models" / "sdn_characters"
    loaded = host.run({"l": {"class_type": "SDN_LoadCharacterBank", "inputs": {"bank_name": path.name}},
                       "p": {"class_type": "PreviewAny", "inputs": {"source": ["l", 1]}}})
    again = loaded.node_output("l", 0)
    assert again.name == name and again.reference_count == references and set(again.entries) == set(bank.entries)
    key = next(iter(bank.entries))
    assert torch.equal(again.entries[key][0].cpu(), bank.entries[key][0].cpu())


def check_merge(result, merge, groups, captions):
    """groups: [(VAEDecode node id, [panel indices of each of its items])]: the merged batch is in story order."""
    merged = result.node_output(merge, 0)
    expected = {}
    for dec, per_item in groups:
        for images, indices in zip(items(result, dec, 0), per_item):
            assert images.shape[0] == len(indices)
            expected.update({i: images[k] for k, i in enumerate(indices)})
    assert sorted(expected) == list(range(len(captions)))
    assert merged.shape[0] == len(captions)
    for i in range(len(captions)):
        assert torch.equal(merged[i], expected[i]), f"panel {i} out of place"
    assert result.node_output(merge, 1).split("\n") == captions
    assert result.node_output(merge, 2) == len(captions)


@pytest.mark.parametrize("name", NAMES)
def test_workflow_links_match_node_definitions(host, name):
    wf, api = load_api(host, name)
    nodes = {n["id"]: n for n in wf["nodes"]}
    for lid, src, slot, dst, dslot, typ in wf["links"]:
        out, inp = nodes[src]["outputs"][slot], nodes[dst]["inputs"][dslot]
        assert out["type"] == typ and lid in out["links"] and inp["link"] == lid
        assert host.node_class(nodes[src]["type"]).RETURN_TYPES[slot] == typ
    for node in wf["nodes"]:
        if node["type"] == "KSampler":
            assert node["widgets_values"][2:6] == next(n for n in wf["nodes"] if n["type"] == "KSampler")["widgets_values"][2:6]
    assert by_type(api, "SDN_RecordCharacterBank") and by_type(api, "SDN_MergePanels")
    assert any(n["type"] == "Note" for n in wf["nodes"])


def shipped_story(pack, wf):
    (node,) = [n for n in wf["nodes"] if n["type"] == "SDN_StoryPrompt"]
    return pack("story.parser").parse_story(node["widgets_values"][0])


def test_shipped_stories(pack):
    """What the shipped stories must show (the SDXL test executes a shorter one: CLIP-G is slow on a CPU)."""
    sel = pack("story.select")
    wf = json.loads((WORKFLOWS / "long_story_sd15.json").read_text())
    story = shipped_story(pack, wf)
    assert len(story.panels) == 12 and sum(p.no_character for p in story.panels) == 1
    assert all(p.caption for p in story.panels) and list(story.characters) == ["Mira"]
    assert [p.index for p in sel.select_panels(story, "references", "Mira", 2)[1].panels] == [0, 1]
    wf = json.loads((WORKFLOWS / "two_characters_sd15.json").read_text())
    story = shipped_story(pack, wf)
    kinds = {len(p.characters) for p in story.panels}
    assert kinds == {0, 1, 2} and any(p.no_character for p in story.panels)
    for name in ("Mira", "Otto"):
        assert sel.select_panels(story, "references", name, 1)[1].panels[0].characters == (name,)
    wf = json.loads((WORKFLOWS / "photo_reference_sdxl.json").read_text())
    story = shipped_story(pack, wf)
    assert sel.select_panels(story, "references", "Ann", 1)[1].panels[0].index == 0
    (encode,) = [n for n in wf["nodes"] if n["type"] == "PhotoMakerEncode"]
    # PhotoMakerEncode finds its trigger with text.split(" "): 'photomaker,' would silently give no identity
    assert "photomaker" in encode["widgets_values"][0].split(" ")


def test_long_story_sd15(host, pack):
    from test_readme import module_state

    wf, api = prepare(host, "long_story_sd15.json", "sd15")
    state = module_state(host)
    result = host.run(api)
    # README: no module of the pack holds mutable state. This run (CSA, a bank recorded, saved and read,
    # batches, pages) leaves every module-level object of the pack as it was.
    changed = sorted(k for k, v in module_state(host).items() if state.get(k) != v)
    assert len(state) >= 5 and not changed, f"module-level state changed by a run: {changed}"
    (prompt,) = by_type(api, "SDN_StoryPrompt")
    story = result.node_output(prompt, 4)
    assert len(story.panels) == 12 and story.panels[2].no_character  # the shipped story
    refs, rest = titled(wf, "SDN_StoryPanels", "references"), titled(wf, "SDN_StoryPanels", "rest")
    assert [p.index for p in result.node_output(refs, 1).panels] == [0, 1]  # first two Mira-only panels
    (bank_node,) = by_type(api, "SDN_CharacterBank")
    (save,) = by_type(api, "SDN_SaveCharacterBank")
    check_bank(host, result, bank_node, save, "Mira", 2)
    (batches,) = by_type(api, "SDN_StoryBatches")
    per_batch = [[p.index for p in s.panels] for s in items(result, batches, 2)]
    assert per_batch == [[2, 3, 4, 5], [6, 7, 8, 9], [10, 11]] and items(result, batches, 3) == [4, 4, 2]
    (read,) = by_type(api, "SDN_ReadCharacterBanks")
    models = items(result, read, 0)
    # panel 2 is the [NC] lighthouse: no bank; every other panel reads Mira's
    assert [routing_of(m) for m in models] == [(["Mira"], ((), (0,), (0,), (0,))),
                                               (["Mira"], ((0,),) * 4), (["Mira"], ((0,), (0,)))]
    rest_ks = titled(wf, "KSampler", "rest")
    assert [tuple(l["samples"].shape) for l in items(result, rest_ks, 0)] == [(4, 4, 8, 8)] * 2 + [(2, 4, 8, 8)]
    (merge,) = by_type(api, "SDN_MergePanels")
    check_merge(result, merge, [(titled(wf, "VAEDecode", "rest"), per_batch),
                                (titled(wf, "VAEDecode", "references"), [[0, 1]])], list(story.captions))
    check_pages(host, pack, result, api, 12)


def test_two_characters_sd15(host, pack):
    wf, api = prepare(host, "two_characters_sd15.json", "sd15")
    result = host.run(api)
    (prompt,) = by_type(api, "SDN_StoryPrompt")
    (batches,) = by_type(api, "SDN_StoryBatches")
    story = result.node_output(prompt, 4)
    assert len(story.panels) == 8  # the shipped story
    assert [p.index for p in result.node_output(titled(wf, "SDN_StoryPanels", "Mira"), 1).panels] == [0]
    assert [p.index for p in result.node_output(titled(wf, "SDN_StoryPanels", "Otto"), 1).panels] == [1]
    for name in ("Mira", "Otto"):
        bank_node = titled(wf, "SDN_CharacterBank", name)
        (save,) = [k for k in by_type(api, "SDN_SaveCharacterBank") if api[k]["inputs"]["bank"][0] == bank_node]
        check_bank(host, result, bank_node, save, name, 1)
    # the two recordings are different characters: different prompts give different banks
    mira = result.node_output(titled(wf, "SDN_CharacterBank", "Mira"), 0)
    otto = result.node_output(titled(wf, "SDN_CharacterBank", "Otto"), 0)
    key = max(mira.entries)
    assert not torch.equal(mira.entries[key][0], otto.entries[key][0])
    per_batch = [[p.index for p in s.panels] for s in items(result, batches, 2)]
    assert per_batch == [[2, 3, 4, 5], [6, 7]]
    (read,) = by_type(api, "SDN_ReadCharacterBanks")
    # panels 2 [NC], 3 Mira+Otto, 4 Otto, 5 Mira | 6 Mira+Otto, 7 [NC]; banks: Mira = 0, Otto = 1
    assert [routing_of(m) for m in items(result, read, 0)] == [
        (["Mira", "Otto"], ((), (0, 1), (1,), (0,))), (["Mira", "Otto"], ((0, 1), ()))]
    (merge,) = by_type(api, "SDN_MergePanels")
    check_merge(result, merge, [(titled(wf, "VAEDecode", "rest"), per_batch),
                                (titled(wf, "VAEDecode", "Mira"), [[0]]), (titled(wf, "VAEDecode", "Otto"), [[1]])],
                list(story.captions))
    check_pages(host, pack, result, api, 8)


@pytest.fixture(scope="module")
def photomaker_file(host):
    """A PhotoMaker v1 ID encoder state dict (ComfyUI's PhotoMakerIDEncoder architecture), deterministic random
    weights, fp16; written once per test session."""

    import importlib

    pm = importlib.import_module("comfy_extras.nodes_photomaker")
    shapes = {k: v.shape for k, v in pm.PhotoMakerIDEncoder().state_dict().items()}  # empty, never run
    return install_random_weights(host, "photomaker", "sdn-random-photomaker-v1.safetensors", shapes, seed=7)


@pytest.fixture(scope="module")
def face_image(host):
    """A small real photo of a face (scikit-image's astronaut, public domain) in ComfyUI's input folder."""
    from skimage import data

    face = Image.fromarray(data.astronaut()[20:250, 140:370]).resize((96, 96))
    path = host.base_directory / "input" / "sdn_face.png"
    face.save(path)
    return path.name


def test_photo_reference_sdxl(host, pack, photomaker_file, face_image):
    wf, api = prepare(host, "photo_reference_sdxl.json", "sdxl")
    (loader,) = by_type(api, "PhotoMakerLoader")
    api[loader]["inputs"]["photomaker_model_name"] = photomaker_file
    (load_image,) = by_type(api, "LoadImage")
    api[load_image]["inputs"]["image"] = face_image
    (prompt,) = by_type(api, "SDN_StoryPrompt")
    # 4 short panels: CLIP-G encodes dominate on a CPU
    api[prompt]["inputs"]["story"] = ("[Ann] a woman\n---\n[Ann] portrait # a\n[Ann] on a bike # b\n[NC] a cafe # c\n"
                                      "[Ann] reading # d")
    (encode,) = by_type(api, "PhotoMakerEncode")
    assert "photomaker" in api[encode]["inputs"]["text"].split(" ")
    result = host.run(api)
    ref_ks = titled(wf, "KSampler", "reference")
    assert api[ref_ks]["inputs"]["positive"] == [encode, 0]  # the reference panel is drawn from the photo
    photo_cond = result.node_output(encode, 0)
    assert photo_cond[0][0].shape[-1] == 2048 and photo_cond[0][1]["pooled_output"].shape == (1, 1280)
    refs = titled(wf, "SDN_StoryPanels", "reference")
    assert [p.index for p in result.node_output(refs, 1).panels] == [0]
    (bank_node,) = by_type(api, "SDN_CharacterBank")
    (save,) = by_type(api, "SDN_SaveCharacterBank")
    check_bank(host, result, bank_node, save, "Ann", 1)
    (batches,) = by_type(api, "SDN_StoryBatches")
    per_batch = [[p.index for p in s.panels] for s in items(result, batches, 2)]
    assert per_batch == [[1, 2], [3]]
    rest_positive = items(result, batches, 0)
    full = result.node_output(prompt, 0)
    assert torch.equal(rest_positive[0][0][1]["pooled_output"], full[0][1]["pooled_output"][1:3])
    (read,) = by_type(api, "SDN_ReadCharacterBanks")
    assert [routing_of(m) for m in items(result, read, 0)] == [(["Ann"], ((0,), ())), (["Ann"], ((0,),))]
    (merge,) = by_type(api, "SDN_MergePanels")
    check_merge(result, merge, [(titled(wf, "VAEDecode", "rest"), per_batch),
                                (titled(wf, "VAEDecode", "reference"), [[0]])], ["a", "b", "c", "d"])
    check_pages(host, pack, result, api, 4)
