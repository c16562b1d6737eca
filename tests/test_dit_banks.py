"""Character banks on DiT models (issue 9): a DiT bank keeps the keys and values (after RoPE) of the references'
sampled image tokens per (step, block, CFG half); reading it equals bank-free reference mode through the real
sampler. Banks are sized before recording and refused above the user's limit; DiT and UNet banks are not mixed."""
import pytest
import torch

from models import small_flux, small_nextdit, small_qwen_image, small_sd3, small_unet
from sampling_helpers import close
from test_dit_csa import TEXT, csa


def draw(model, kind, noise, cond, steps=2, cfg=3.0):
    """The stock sampler on given noise and per-image text (``cond`` ``[B, TEXT, 32]``), negative broadcast."""
    import comfy.sample

    extra = lambda n: {"pooled_output": torch.ones(n, 32)}  # noqa: E731  (Flux's encode_adm reads it)
    negative = [[torch.randn(1, TEXT, 32, generator=torch.Generator().manual_seed(99)), extra(1)]]
    return comfy.sample.sample(model, noise, steps, cfg, "euler", "simple", [[cond, extra(cond.shape[0])]], negative,
                               torch.zeros_like(noise), seed=0, disable_pbar=True)


def latents(kind, n, gen, size=6):
    return torch.randn(n, 16, 1, size, size, generator=gen) if kind == "qwen" else torch.randn(n, 16, size, size,
                                                                                                generator=gen)


def small(kind):
    if kind in ("zimage", "sd35"):  # models that name no block to the hook on 0.3.75: their calls are counted
        return small_nextdit(kind) if kind == "zimage" else small_sd3(kind)
    return small_qwen_image() if kind == "qwen" else small_flux(kind)


def record(pack, model, kind, noise, cond, rate=0.5, dtype=torch.float32, max_bytes=0, **kw):
    bank_mod, patch = pack("attention.bank"), pack("attention.patch")
    rec = bank_mod.BankRecorder(storage_dtype=dtype, max_bytes=max_bytes)
    out = draw(patch.apply_recording(csa(pack, model, rate=rate, seed=3, **kw), rec), kind, noise, cond)
    return rec, out


@pytest.mark.parametrize("kind", ["flux1", "qwen", "zimage", "sd35"])
def test_reading_a_dit_bank_equals_references_in_front(host, pack, kind):
    # Bank-free reference mode: the R references in front of the panels, CSA with reference_count = R. The
    # references share among themselves as when recorded alone; every panel sees exactly the bank's keys/values.
    bank_mod, patch = pack("attention.bank"), pack("attention.patch")
    model, refs, panels = small(kind), 2, 3
    gen = torch.Generator().manual_seed(11)
    ref_cond, story_cond = torch.randn(refs, TEXT, 32, generator=gen), torch.randn(panels, TEXT, 32, generator=gen)
    ref_noise, story_noise = latents(kind, refs, gen), latents(kind, panels, gen)
    rec, alone = record(pack, model, kind, ref_noise, ref_cond)
    bank = bank_mod.CharacterBank.from_recorder(rec, "hero", "")
    assert bank.kind == "dit" and bank.layers == {"double.0", "single.0"} if kind == "flux1" else bank.kind == "dit"
    read = draw(patch.apply_reading(model, patch.BankReader((bank,))), kind, story_noise, story_cond)
    together = draw(csa(pack, model, rate=0.5, refs=refs, seed=3), kind, torch.cat((ref_noise, story_noise)),
                    torch.cat((ref_cond, story_cond)))
    torch.testing.assert_close(together[:refs], alone, atol=1e-5, rtol=0)
    torch.testing.assert_close(together[refs:], read, atol=1e-5, rtol=0)
    assert (read - draw(model, kind, story_noise, story_cond)).abs().max() > 1e-3, "the bank changed nothing"


def test_a_bank_of_one_reference_equals_it_in_front(host, pack):
    # One reference shares with no other image while it is recorded; its sampled tokens are recorded all the same.
    bank_mod, patch = pack("attention.bank"), pack("attention.patch")
    model, gen = small_flux("flux1"), torch.Generator().manual_seed(12)
    ref_noise, noise = latents("flux1", 1, gen), latents("flux1", 2, gen)
    ref_cond, cond = torch.randn(1, TEXT, 32, generator=gen), torch.randn(2, TEXT, 32, generator=gen)
    rec, alone = record(pack, model, "flux1", ref_noise, ref_cond)
    bank = bank_mod.CharacterBank.from_recorder(rec, "hero", "")
    assert bank.kind == "dit" and len(bank.entries) == 2 * 2 * 2  # 2 steps x 2 blocks x 2 CFG halves
    read = draw(patch.apply_reading(model, patch.BankReader((bank,))), "flux1", noise, cond)
    together = draw(csa(pack, model, rate=0.5, refs=1, seed=3), "flux1", torch.cat((ref_noise, noise)),
                    torch.cat((ref_cond, cond)))
    close(together[:1], alone)
    close(together[1:], read)
    assert (read - draw(model, "flux1", noise, cond)).abs().max() > 1e-3, "the bank changed nothing"


def test_dit_bank_read_with_sharing_and_routing_equals_the_per_panel_reads(host, pack):
    # Two characters and an [NC] panel: panel 0 reads A, panel 1 reads A and B, panel 2 none (groups by key count).
    # Without sharing each panel's result is its own read of its banks alone; sharing within the batch adds CSA.
    bank_mod, patch = pack("attention.bank"), pack("attention.patch")
    model, gen = small_flux("flux1"), torch.Generator().manual_seed(5)
    banks = []
    for name in ("A", "B"):
        rec, _ = record(pack, model, "flux1", latents("flux1", 2, gen), torch.randn(2, TEXT, 32, generator=gen))
        banks.append(bank_mod.CharacterBank.from_recorder(rec, name, ""))
    noise, cond = latents("flux1", 3, gen), torch.randn(3, TEXT, 32, generator=gen)
    routed = draw(patch.apply_reading(model, patch.BankReader(tuple(banks), ((0,), (0, 1), ()))), "flux1", noise, cond)
    for i, use in enumerate(((0,), (0, 1), ())):
        reader = model if not use else patch.apply_reading(model, patch.BankReader(tuple(banks[j] for j in use)))
        # up to the rounding of another batch size (the plain model differs by ~1.5e-4 on values up to ~100)
        torch.testing.assert_close(routed[i:i + 1], draw(reader, "flux1", noise[i:i + 1], cond[i:i + 1]),
                                   atol=5e-4, rtol=0)
    assert (routed[1] - draw(model, "flux1", noise, cond)[1]).abs().max() > 1e-2, "the banks changed nothing"
    shared = patch.apply_reading(csa(pack, model, rate=0.5, seed=3), patch.BankReader(tuple(banks), share=True))
    assert (draw(shared, "flux1", noise, cond) - routed).abs().max() > 1e-4, "sharing within the batch changed nothing"


@pytest.mark.parametrize("kind", ["unet", "flux1"])
@pytest.mark.parametrize("schedule, dtype", [("always", torch.float16), ("storydiffusion", torch.float8_e4m3fn)])
def test_estimate_equals_the_recorded_bytes(host, pack, kind, schedule, dtype):
    bank_mod = pack("attention.bank")
    gen = torch.Generator().manual_seed(1)
    if kind == "unet":
        import comfy.sample

        from sampling_helpers import csa_model
        patch = pack("attention.patch")
        rec = bank_mod.BankRecorder(storage_dtype=dtype)
        model = patch.apply_recording(csa_model(pack, small_unet("sd15", scale=0.05), rate=0.5, seed=3,
                                                schedule=schedule), rec)
        noise = torch.randn(2, 4, 16, 16, generator=gen)
        comfy.sample.sample(model, noise, 4, 5.0, "euler", "normal", [[torch.randn(2, 77, 64, generator=gen), {}]],
                            [[torch.randn(1, 77, 64, generator=gen), {}]], torch.zeros_like(noise), seed=0,
                            disable_pbar=True)
    else:
        rec, _ = record(pack, small_flux("flux1", depth=2, single=2), "flux1", latents("flux1", 2, gen),
                        torch.randn(2, TEXT, 32, generator=gen), dtype=dtype, schedule=schedule)
    bank = bank_mod.CharacterBank.from_recorder(rec, "hero", "")
    assert bank.size_bytes > 0 and rec.estimate == bank.size_bytes


def test_limit_refuses_with_the_estimate_and_records_nothing(host, pack):
    errors = pack("errors")
    gen = torch.Generator().manual_seed(2)
    noise, cond = latents("flux1", 2, gen), torch.randn(2, TEXT, 32, generator=gen)
    rec, _ = record(pack, small_flux("flux1"), "flux1", noise, cond)
    size = rec.estimate
    with pytest.raises(errors.StoryDiffusionError) as info:
        record(pack, small_flux("flux1"), "flux1", noise, cond, max_bytes=size - 1)
    message = str(info.value)
    assert "max_size_gb" in message and "reference_count" in message and f"{size / 1e9:.2f} GB" in message
    # the formula: 2 blocks x 2 steps x 2 CFG halves of 2 references x round(0.5 x 9) = 5 image tokens x keys and values
    assert f"{size} bytes = 8 (step, layer, CFG half) x 2 reference(s) x 5 of 9 tokens x 2 (keys, values) x 64 " \
           "channels x 4 B" in message
    assert size == 8 * 2 * 5 * 2 * 64 * 4
    # an unlimited recorder of the same run gets the same size; a limited one that refused holds nothing
    refused = pack("attention.bank").BankRecorder(storage_dtype=torch.float32, max_bytes=size - 1)
    with pytest.raises(errors.StoryDiffusionError):
        draw(pack("attention.patch").apply_recording(csa(pack, small_flux("flux1"), rate=0.5, seed=3), refused),
             "flux1", noise, cond)
    assert refused.entries == {} and refused.estimate == size


def test_cfg_one_estimates_one_half(host, pack):
    gen = torch.Generator().manual_seed(2)
    noise, cond = latents("flux1", 2, gen), torch.randn(2, TEXT, 32, generator=gen)
    bank_mod, patch = pack("attention.bank"), pack("attention.patch")
    rec = bank_mod.BankRecorder(storage_dtype=torch.float32)
    draw(patch.apply_recording(csa(pack, small_flux("flux1"), rate=0.5, seed=3), rec), "flux1", noise, cond, cfg=1.0)
    bank = bank_mod.CharacterBank.from_recorder(rec, "hero", "")
    assert {key[2] for key in bank.entries} == {0} and rec.estimate == bank.size_bytes


def test_dit_bank_file_round_trip(host, pack, tmp_path):
    bank_mod, patch = pack("attention.bank"), pack("attention.patch")
    model, gen = small_flux("flux1"), torch.Generator().manual_seed(4)
    rec, _ = record(pack, model, "flux1", latents("flux1", 2, gen), torch.randn(2, TEXT, 32, generator=gen),
                    dtype=torch.float8_e4m3fn)
    bank = bank_mod.CharacterBank.from_recorder(rec, "hero", "a knight")
    loaded = bank_mod.CharacterBank.load(bank.save(tmp_path / "hero.safetensors"))
    assert loaded.kind == "dit" and loaded.entries.keys() == bank.entries.keys()
    assert all(torch.equal(loaded.entries[k].hidden.view(torch.uint8), bank.entries[k].hidden.view(torch.uint8))
               for k in bank.entries)
    noise, cond = latents("flux1", 2, gen), torch.randn(2, TEXT, 32, generator=gen)
    torch.testing.assert_close(draw(patch.apply_reading(model, patch.BankReader((loaded,))), "flux1", noise, cond),
                               draw(patch.apply_reading(model, patch.BankReader((bank,))), "flux1", noise, cond),
                               atol=0, rtol=0)


def test_banks_of_the_other_kind_are_refused(host, pack):
    from sampling_helpers import csa_model

    bank_mod, patch = pack("attention.bank"), pack("attention.patch")
    gen = torch.Generator().manual_seed(6)
    rec, _ = record(pack, small_flux("flux1"), "flux1", latents("flux1", 2, gen),
                    torch.randn(2, TEXT, 32, generator=gen))
    dit_bank = bank_mod.CharacterBank.from_recorder(rec, "hero", "")
    unet = small_unet("sd15", scale=0.05)
    with pytest.raises(bank_mod.BankMismatchError, match="SDN_ReadCharacterBanks.*'hero' was recorded on a DiT.*UNet"):
        patch.apply_reading(unet, patch.BankReader((dit_bank,)))
    import comfy.sample

    unet_rec = bank_mod.BankRecorder()
    noise = torch.randn(1, 4, 16, 16, generator=gen)
    comfy.sample.sample(patch.apply_recording(csa_model(pack, unet, rate=0.5), unet_rec), noise, 1, 5.0, "euler",
                        "normal", [[torch.randn(1, 77, 64, generator=gen), {}]], [[torch.randn(1, 77, 64), {}]],
                        torch.zeros_like(noise), seed=0, disable_pbar=True)
    unet_bank = bank_mod.CharacterBank.from_recorder(unet_rec, "ann", "")
    with pytest.raises(bank_mod.BankMismatchError, match="'ann' was recorded on a UNet.*a DiT \\(Flux.1\\)"):
        patch.apply_reading(small_flux("flux1"), patch.BankReader((unet_bank,)))
