"""The shipped Flux.1-dev workflows, executed end to end through ComfyUI's validator and executor: comic_flux
(all panels in one CSA batch) and long_story_flux (bank-free references in front of every batch).

The Flux.1-dev and Flux VAE files go through the stock UNETLoader and VAELoader (tests/checkpoints.py: Flux.1's
real key format at full width, one double and one single block, random weights); the stock DualCLIPLoader is
swapped for SDNTest_TinyTextEncoders (same ComfyUI loading function, small CLIP-L and T5-XXL files). Sizes, steps
and pages are shrunk for the CPU; everything else is the shipped graph. Expectations (reference panels, story
order) are written here from the story text, not taken from the code under test.
"""
import torch

from test_bank_workflows import SIZE, by_type, check_pages, items, load_api, shrink, stock_model_files


def prepare(host, name, files):
    wf, api = load_api(host, name)
    (loader,) = by_type(api, "DualCLIPLoader")
    assert api[loader]["inputs"]["type"] == "flux"
    api[loader] = {"class_type": "SDNTest_TinyTextEncoders",
                   "inputs": {"clip_name1": files["clip_l"], "clip_name2": files["t5xxl"], "type": "flux"}}
    return wf, shrink(stock_model_files(api, files))


def check_sampler(pack, result, api, reference_count):
    """The stock KSampler at cfg 1 samples the CSA model (Flux.1-dev's single-stream block: the file has one) and
    the FluxGuidance conditioning with guidance 3.5."""
    import comfy.patcher_extension as ext

    (sampler,) = by_type(api, "KSampler")
    inputs = api[sampler]["inputs"]
    assert inputs["cfg"] == 1.0 and (inputs["sampler_name"], inputs["scheduler"]) == ("euler", "simple")
    (csa,) = by_type(api, "SDN_ConsistentSelfAttention")
    (guidance,) = by_type(api, "FluxGuidance")
    assert inputs["model"] == [csa, 0] and inputs["positive"] == [guidance, 0]
    model = result.node_output(csa, 0)
    settings = pack("attention.patch").csa_settings_of(model)
    assert settings.reference_count == reference_count and settings.dit_blocks == ("single",)
    (spec,) = model.get_wrappers(ext.WrappersMP.APPLY_MODEL, "storydiffusion_native")
    assert set(spec.layers) == {"single.0"}
    for conditioning in items(result, guidance, 0):
        assert [extras["guidance"] for _, extras in conditioning] == [3.5]


def test_comic_flux_through_the_stock_loaders(host, pack, flux_files):
    wf, api = prepare(host, "comic_flux.json", flux_files)
    result = host.run(api)
    check_sampler(pack, result, api, reference_count=0)
    (story,) = by_type(api, "SDN_StoryPrompt")
    assert result.node_output(story, 2) == 4
    (decode,) = by_type(api, "VAEDecode")
    assert result.node_output(decode, 0).shape == (4, SIZE, SIZE, 3)  # one CSA batch of every panel
    check_pages(host, pack, result, api, 4)


def test_long_story_flux_bank_free_references(host, pack, flux_files):
    wf, api = prepare(host, "long_story_flux.json", flux_files)
    result = host.run(api)
    check_sampler(pack, result, api, reference_count=2)
    (story,) = by_type(api, "SDN_StoryPrompt")
    captions = [p.caption for p in result.node_output(story, 4).panels]
    assert len(captions) == 8
    # The first two panels (only Mira) are the references, in front of both batches of 3.
    (batches,) = by_type(api, "SDN_StoryBatches")
    assert [[p.index for p in s.panels] for s in items(result, batches, 2)] == [[0, 1, 2, 3, 4], [0, 1, 5, 6, 7]]
    (decode,) = by_type(api, "VAEDecode")
    first, second = items(result, decode, 0)
    assert first.shape == second.shape == (5, SIZE, SIZE, 3)
    # Same prompts, noise and attention: the references come out the same in both batches.
    torch.testing.assert_close(first[:2], second[:2], rtol=0, atol=1e-4)
    assert (first[2:] - first[:1]).abs().amax() > 1e-3  # and the other panels differ from them
    (merge,) = by_type(api, "SDN_MergePanels")
    merged = result.node_output(merge, 0)
    assert merged.shape[0] == 8 and result.node_output(merge, 1).split("\n") == captions
    for i, image in enumerate([*first, *second[2:]]):
        assert torch.equal(merged[i], image), f"panel {i} out of place"
    check_pages(host, pack, result, api, 8)
