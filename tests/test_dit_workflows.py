"""The shipped Qwen-Image comic workflow (comic_qwen_image), executed end to end through ComfyUI's validator and
executor.

The Qwen-Image and Wan 2.1 VAE files go through the stock UNETLoader and VAELoader (tests/checkpoints.py
``write_random_qwen_image_files``: the real key formats, which ComfyUI's model detection reads as Qwen-Image at
full width with two joint blocks, random weights); the stock CLIPLoader is swapped for SDNTest_TinyTextEncoder
(same ComfyUI loading function, a one-layer Qwen2.5-VL 7B file). Sizes, steps and pages are shrunk for the CPU;
everything else is the shipped graph. Z-Image is not used here: ComfyUI 0.3.75 detects it only at its full width
(3840, every block at full size), too large a file for a CPU test.
"""
import torch

from test_bank_workflows import SIZE, by_type, check_pages, load_api, shrink, stock_model_files

STEPS = 1  # CSA runs at every step; one shows it (a full-width Qwen-Image step is seconds on a CPU)


def prepare(host, name, files):
    wf, api = load_api(host, name)
    (loader,) = by_type(api, "CLIPLoader")
    assert api[loader]["inputs"]["type"] == "qwen_image"
    api[loader] = {"class_type": "SDNTest_TinyTextEncoder",
                   "inputs": {"clip_name": files["clip"], "type": "qwen_image"}}
    return wf, shrink(stock_model_files(api, files), STEPS)


def test_comic_qwen_image_through_the_stock_loaders(host, pack, qwen_image_files):
    import comfy.ldm.qwen_image.model as qwen_image
    import comfy.patcher_extension as ext

    wf, api = prepare(host, "comic_qwen_image.json", qwen_image_files)
    (sampler,) = by_type(api, "KSampler")
    (csa,) = by_type(api, "SDN_ConsistentSelfAttention")
    (shift,) = by_type(api, "ModelSamplingAuraFlow")
    (decode,) = by_type(api, "VAEDecode")
    # Beside the shipped graph, in the same prompt (loaded and encoded once): its KSampler on the model without CSA.
    api["plain"] = {"class_type": "KSampler", "inputs": dict(api[sampler]["inputs"], model=[shift, 0])}
    api["plain_decode"] = {"class_type": "VAEDecode", "inputs": dict(api[decode]["inputs"], samples=["plain", 0])}
    api["plain_preview"] = {"class_type": "PreviewImage", "inputs": {"images": ["plain_decode", 0]}}
    result = host.run(api)

    # The stock loader detected Qwen-Image; the KSampler (ComfyUI's template settings) samples the CSA model, patched
    # on the later half of the joint blocks (the second of two) and keeping ModelSamplingAuraFlow's shift.
    inputs = api[sampler]["inputs"]
    assert (inputs["cfg"], inputs["sampler_name"], inputs["scheduler"]) == (2.5, "euler", "simple")
    assert inputs["model"] == [csa, 0] and api[csa]["inputs"]["model"] == [shift, 0]
    model = result.node_output(csa, 0)
    net = model.get_model_object("diffusion_model")
    assert type(net) is qwen_image.QwenImageTransformer2DModel and len(net.transformer_blocks) == 2
    assert model.get_model_object("model_sampling").shift == api[shift]["inputs"]["shift"] == 3.1
    assert pack("attention.patch").csa_settings_of(model).dit_blocks == ("single",)
    (spec,) = model.get_wrappers(ext.WrappersMP.APPLY_MODEL, "storydiffusion_native")
    assert set(spec.layers) == {"double.1"}

    (story,) = by_type(api, "SDN_StoryPrompt")
    assert result.node_output(story, 2) == 4
    panels = result.node_output(decode, 0)
    assert panels.shape == (4, SIZE, SIZE, 3)  # one CSA batch of every panel
    check_pages(host, pack, result, api, 4)
    plain = result.node_output("plain_decode", 0)
    assert plain.shape == panels.shape and (plain - panels).abs().amax() > 1e-3  # CSA changed the panels


def test_comic_qwen_image_links_match_node_definitions(host):
    wf, _ = load_api(host, "comic_qwen_image.json")
    nodes = {n["id"]: n for n in wf["nodes"]}
    for lid, src, slot, dst, dslot, typ in wf["links"]:
        out, inp = nodes[src]["outputs"][slot], nodes[dst]["inputs"][dslot]
        assert out["type"] == typ and lid in out["links"] and inp["link"] == lid
        assert host.node_class(nodes[src]["type"]).RETURN_TYPES[slot] == typ
    linked = {(lid, src) for lid, src, *_ in wf["links"]}
    assert {(lid, n["id"]) for n in wf["nodes"] for o in n["outputs"] for lid in o["links"] or []} == linked
    assert any(n["type"] == "Note" for n in wf["nodes"])
