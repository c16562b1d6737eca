"""The shipped comic workflows, executed end to end through ComfyUI's validator and executor.

SD1.5: through the stock CheckpointLoaderSimple on a full-size random-weight SD1.5 checkpoint.
SDXL: the loader is swapped for SDNTest_TinyCheckpoint (real SDXL block layout, small widths, real CLIP-L/G
and VAE architectures). Sizes and steps are shrunk for the CPU; everything else is the shipped graph.
"""
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

WORKFLOWS = Path(__file__).resolve().parent.parent / "workflows"


def load_api(host, name):
    import sdn_host

    wf = json.loads((WORKFLOWS / name).read_text())
    return wf, sdn_host.ui_to_api(wf, host.nodes.NODE_CLASS_MAPPINGS)


def by_type(api, ctype):
    return [k for k, v in api.items() if v["class_type"] == ctype]


def shrink(api, size=64, steps=2, page=256):
    (latent,) = by_type(api, "EmptyLatentImage")
    api[latent]["inputs"].update(width=size, height=size)
    (ks,) = by_type(api, "KSampler")
    api[ks]["inputs"]["steps"] = steps
    (layout,) = by_type(api, "SDN_ComicLayout")
    api[layout]["inputs"].update(page_width=page, page_height=page)
    return api


def check_pages(host, result, api, panels, page):
    (save,) = by_type(api, "SaveImage")
    images = result.outputs[save]["images"]
    (layout,) = by_type(api, "SDN_ComicLayout")
    per_page = 4 if api[layout]["inputs"]["layout"] == "four panel" else None
    if per_page:
        assert len(images) == -(-panels // per_page)
    for item in images:
        path = host.base_directory / "output" / item["subfolder"] / item["filename"]
        img = np.asarray(Image.open(path).convert("RGB"))
        assert img.shape == (page, page, 3)
        assert img.std() > 5  # panels and borders drawn, not a blank page


@pytest.mark.parametrize("name", ["comic_sd15.json", "comic_sdxl.json"])
def test_workflow_links_match_node_definitions(host, name):
    wf, api = load_api(host, name)
    nodes = {n["id"]: n for n in wf["nodes"]}
    for lid, src, slot, dst, dslot, typ in wf["links"]:
        out = nodes[src]["outputs"][slot]
        inp = nodes[dst]["inputs"][dslot]
        assert out["type"] == typ and lid in out["links"] and inp["link"] == lid
        cls = host.node_class(nodes[src]["type"])
        assert cls.RETURN_TYPES[slot] == typ
    assert by_type(api, "SDN_ConsistentSelfAttention") and by_type(api, "SDN_StoryPrompt")


def test_comic_sd15_through_stock_checkpoint_loader(host, sd15_checkpoint):
    wf, api = load_api(host, "comic_sd15.json")
    (loader,) = by_type(api, "CheckpointLoaderSimple")
    api[loader]["inputs"]["ckpt_name"] = sd15_checkpoint
    result = host.run(shrink(api))
    (story,) = by_type(api, "SDN_StoryPrompt")
    panels = result.node_output(story, 2)
    assert panels == 4
    (csa,) = by_type(api, "SDN_ConsistentSelfAttention")
    patched = result.node_output(csa, 0)
    assert len(patched.model_options["transformer_options"]["patches_replace"]["attn1"]) == 9  # SD1.5 decoder
    check_pages(host, result, api, panels, 256)
    # the story's dialogue lines, drawn as bubbles: the layout lists them in story order, the mask covers them
    (layout,) = by_type(api, "SDN_ComicLayout")
    bubbles = json.loads(result.node_output(layout, 1))
    story = result.node_output(story, 4)
    assert [(b["panel"], b["kind"], b["speaker"], b["text"]) for b in bubbles] == [
        (i, d.kind, d.speaker, d.text) for i, p in enumerate(story.panels) for d in p.dialogue]
    assert {b["kind"] for b in bubbles} == {"speech", "thought", "shout", "whisper", "narration"}
    masks = result.node_output(layout, 2)
    assert masks.shape == (1, 256, 256) and 0 < masks.mean() < 0.5
    for b in bubbles:
        x0, y0, x1, y1 = b["box"]
        assert b["page"] == 0 and masks[0, (y0 + y1) // 2, (x0 + x1) // 2] == 1


def test_comic_sdxl_with_small_model(host):
    wf, api = load_api(host, "comic_sdxl.json")
    (loader,) = by_type(api, "CheckpointLoaderSimple")
    api[loader] = {"class_type": "SDNTest_TinyCheckpoint", "inputs": {"kind": "sdxl", "seed": 0}}
    (story,) = by_type(api, "SDN_StoryPrompt")
    # A 3-panel story: CLIP-G encodes are the slow part on a CPU.
    api[story]["inputs"]["story"] = "[Ann] a knight in red armour\n[Ann] in a forest # one\n[NC] a castle\n[Ann] on a hill # three"
    result = host.run(shrink(api, size=64, steps=2))
    positive = result.node_output(story, 0)
    assert positive[0][0].shape[0] == 3 and positive[0][1]["pooled_output"].shape == (3, 1280)
    check_pages(host, result, api, 3, 256)
