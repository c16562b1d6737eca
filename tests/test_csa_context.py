"""One context per model call: no host syncs in the layers, and bank-free reference mode equals bank reading.

Through ComfyUI's real sampler on the real SDXL / SD1.5 block layouts (small widths, random weights).
"""
import pytest
import torch

from host_syncs import syncs_per_call
from sampling_helpers import csa_model


# The patched layers: 70 in SDXL's encoder, middle and decoder. A sync per layer call would add 70 per model call;
# the context's one read of the call's sigma is all a patched model may add (plus the run's schedule, once).
EVERY_BLOCK = ("input", "middle", "output")
EXTRA_PER_CALL = 1.5


@pytest.mark.parametrize("schedule", ["always", "storydiffusion"])
def test_csa_adds_no_host_sync_per_layer(pack, sdxl, schedule):
    plain = syncs_per_call(sdxl)
    patched = syncs_per_call(csa_model(pack, sdxl, rate=0.5, schedule=schedule, blocks=EVERY_BLOCK))
    assert patched - plain <= EXTRA_PER_CALL, (plain, patched)


def test_recording_and_reading_add_no_host_sync_per_layer(pack, sdxl):
    bank_mod, patch = pack("attention.bank"), pack("attention.patch")
    plain = syncs_per_call(sdxl)
    csa = csa_model(pack, sdxl, rate=0.5, blocks=EVERY_BLOCK)
    rec = bank_mod.BankRecorder(storage_dtype=torch.float8_e4m3fn)
    recording = syncs_per_call(patch.apply_recording(csa, rec), images=2)
    assert recording - plain <= EXTRA_PER_CALL, (plain, recording)
    bank = bank_mod.CharacterBank.from_recorder(rec, "hero", "")
    assert len(bank.layers) == 70
    for model in (patch.apply_reading(sdxl, patch.BankReader((bank,))),
                  patch.apply_reading(csa, patch.BankReader((bank,), share=True))):
        reading = syncs_per_call(model)
        assert reading - plain <= EXTRA_PER_CALL, (plain, reading)


def draw(model, noise, cond, steps):
    """The stock sampler on given noise and per-image conditioning (Euler, CFG 5, negative broadcast). SDXL: each
    row's pooled vector is a function of its tokens (its first 20 x 64 values), so a panel gets the same one in
    every batch."""
    import comfy.sample

    negative = torch.randn(1, 77, 64, generator=torch.Generator().manual_seed(99))
    pooled = (lambda c: {"pooled_output": c[:, :20].reshape(c.shape[0], -1)}) \
        if model.model.model_config.unet_config.get("adm_in_channels") else (lambda c: {})
    return comfy.sample.sample(model, noise, steps, 5.0, "euler", "normal", [[cond, pooled(cond)]],
                               [[negative, pooled(negative)]], torch.zeros_like(noise), seed=0, disable_pbar=True)


@pytest.mark.parametrize("schedule, steps", [("always", 2), ("storydiffusion", 4)])
def test_references_in_front_of_a_batch_equal_reading_their_bank(pack, sd15, schedule, steps):
    # Bank-free reference mode: R reference panels, with their own noise and prompts, in front of the story
    # panels, CSA with reference_count = R. The references share among themselves exactly as when they were drawn
    # alone while recording, and every story panel sees exactly the tokens the bank holds.
    bank_mod, patch = pack("attention.bank"), pack("attention.patch")
    refs, panels = 2, 3
    gen = torch.Generator().manual_seed(11)
    ref_cond, story_cond = torch.randn(refs, 77, 64, generator=gen), torch.randn(panels, 77, 64, generator=gen)
    ref_noise, story_noise = torch.randn(refs, 4, 16, 16, generator=gen), torch.randn(panels, 4, 16, 16, generator=gen)

    def csa(reference_count):
        return csa_model(pack, sd15, rate=0.5, refs=reference_count, seed=3, schedule=schedule)
    rec = bank_mod.BankRecorder(storage_dtype=torch.float32)
    alone = draw(patch.apply_recording(csa(0), rec), ref_noise, ref_cond, steps)
    bank = bank_mod.CharacterBank.from_recorder(rec, "hero", "")
    read = draw(patch.apply_reading(sd15, patch.BankReader((bank,))), story_noise, story_cond, steps)
    together = draw(csa(refs), torch.cat((ref_noise, story_noise)), torch.cat((ref_cond, story_cond)), steps)
    torch.testing.assert_close(together[:refs], alone, atol=1e-5, rtol=0)
    torch.testing.assert_close(together[refs:], read, atol=1e-5, rtol=0)
    # the bank acts: the panels differ from panels drawn without it by far more than the tolerance
    assert (read - draw(sd15, story_noise, story_cond, steps)).abs().max() > 1e-4


def test_story_batches_reference_mode_equals_reading_the_bank(host, pack, sd15):
    # The same through the nodes and the stock KSampler: SDN_StoryBatches with reference_positive/reference_story
    # puts the references (their own noise indices) in front of every batch; Merge Panels keeps them once. Against:
    # the references drawn alone while recording a bank, then every batch of the rest reading it, each panel with
    # the same noise index (batch_index, as the bank-free batches give it).
    import nodes as comfy_nodes

    sel, story_nodes = pack("story.select"), pack("nodes.story_nodes")
    patch, bank_mod = pack("attention.patch"), pack("attention.bank")
    story = pack("story.parser").parse_story(
        "[Ann] a girl\n---\n[Ann] one\n[Ann] two\n[Ann] three\n[Ann] four\n[Ann] five\n")
    gen = torch.Generator().manual_seed(5)
    full = [[torch.randn(5, 77, 64, generator=gen), {}]]
    negative = [[torch.randn(1, 77, 64, generator=gen), {}]]
    ref_pos, refs = sel.select_panels(story, "references", "Ann", 2)
    rest_pos, rest = sel.select_panels(story, "rest", "", 2)
    ref_cond, rest_cond = (sel.slice_conditioning(full, pos, 5, "test") for pos in (ref_pos, rest_pos))

    def ksampler(model, positive, latent):
        (out,) = comfy_nodes.common_ksampler(model, 7, 2, 5.0, "euler", "normal", positive, negative, latent)
        return out["samples"]

    def csa(reference_count):
        return csa_model(pack, sd15, rate=0.5, refs=reference_count, seed=3)

    rec = bank_mod.BankRecorder(storage_dtype=torch.float32)
    alone = ksampler(patch.apply_recording(csa(0), rec), ref_cond, {"samples": torch.zeros(2, 4, 16, 16)})
    reader = patch.apply_reading(sd15, patch.BankReader((bank_mod.CharacterBank.from_recorder(rec, "Ann", ""),)))
    read = torch.cat([ksampler(reader, sel.slice_conditioning(rest_cond, rows, 3, "test"),
                               {"samples": torch.zeros(len(rows), 4, 16, 16), "batch_index": [2 + i for i in rows]})
                      for rows in sel.split_batches(3, 2)])

    conds, latents, stories, _ = story_nodes.StoryBatches.execute(
        rest_cond, rest, 2, 128, 128, reference_positive=ref_cond, reference_story=refs).result
    drawn = [ksampler(csa(2), c, l).permute(0, 2, 3, 1) for c, l in zip(conds, latents)]  # as IMAGE (B, H, W, C)
    merged, _, count = story_nodes.MergePanels.execute(drawn, stories).result
    assert count == 5
    # equal up to float32 rounding (batches of other sizes sum in another order)
    torch.testing.assert_close(drawn[1][:2], drawn[0][:2], atol=3e-4, rtol=0)  # the references, in every batch
    torch.testing.assert_close(merged[:2], alone.permute(0, 2, 3, 1), atol=3e-4, rtol=0)
    torch.testing.assert_close(merged[2:], read.permute(0, 2, 3, 1), atol=3e-4, rtol=0)
    plain = torch.cat([ksampler(sd15, sel.slice_conditioning(rest_cond, rows, 3, "test"),
                                {"samples": torch.zeros(len(rows), 4, 16, 16), "batch_index": [2 + i for i in rows]})
                       for rows in sel.split_batches(3, 2)])
    assert (read - plain).abs().max() > 1e-2  # the references act on the panels, far beyond the tolerance
