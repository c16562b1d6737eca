"""Character banks with subject masks (issue 10) on a small real SD1.5 UNet through ComfyUI's sampler.

Write phase: every recorded token carries its region bit (does it lie in the region of the character its reference
panel names, at that step). Read phase: a query of a panel's k-th character sees its own tokens and the tokens of
that character's bank whose bit is set. The definition is checked against bank-free reference mode with subject
masks (tests/test_subject_masks.py checks that one against a per-query oracle): the references in front of the
panels, given masks, give every panel exactly what reading their banks gives.
"""
import pytest
import torch

from sampling_helpers import sample
from test_csa_context import draw
from test_subject_masks import SIZE, given_masks, parsed, regions_at

CHARACTERS = "[A] a fox\n[B] a cat\n---\n"
STEPS = 2


def story(pack, *panels):
    return parsed(pack, CHARACTERS + "".join(f"{p}\n" for p in panels))


def settings(pack, rate, refs=0, seed=3):
    patch = pack("attention.patch")
    return patch.CSASettings(rates=((8, rate), (16, rate), (32, rate)), reference_count=refs, seed=seed,
                             subject_masks=True)


def masked(pack, model, panels, soft, rate=None, refs=0):
    """``model`` (with subject-masked CSA at ``rate`` when given) sampling the story ``panels`` with the given
    soft masks through SDN_CharacterMasks' model."""
    patch, masks = pack("attention.patch"), pack("attention.masks")
    if rate is not None:
        model = patch.apply_csa(model, settings(pack, rate, refs))
    return masks.apply_masks(model, story(pack, *panels), soft)[0]


def record(pack, model, panels, soft, rate, noise, cond, name="A", dtype=torch.float32):
    """Record a bank from the reference ``panels`` (each naming ``name``) drawn alone; returns (bank, latents)."""
    bank_mod, patch = pack("attention.bank"), pack("attention.patch")
    csa = masked(pack, model, panels, soft, rate)
    rec = bank_mod.BankRecorder(storage_dtype=dtype, fingerprint=bank_mod.model_fingerprint(csa),
                                settings=patch.csa_settings_of(csa).as_dict())
    out = draw(patch.apply_recording(csa, rec), noise, cond, STEPS)
    assert rec.subject == name
    return bank_mod.CharacterBank.from_recorder(rec, name, ""), out


def read_node(host, model, banks, panels, pack, subject_masks=True, share=False):
    node = host.node_class("SDN_ReadCharacterBanks")
    extra = {f"bank_{i + 2}": b for i, b in enumerate(banks[1:])}
    return node.execute(model, banks[0], share, story=story(pack, *panels), subject_masks=subject_masks,
                        **extra)[0]


def inputs(count, seed):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(count, 4, SIZE, SIZE, generator=gen), torch.randn(count, 77, 64, generator=gen)


def test_reading_equals_reference_mode_with_subject_masks(host, pack, sd15):
    # Two references of A recorded together at rate 0.5 (they share among themselves, masked), then panels naming
    # A or nobody ([NC]). Against: the references in front of the panels, CSA with reference_count 2 and subject
    # masks, the same given masks.
    refs, panels = ("[A] one", "[A] two"), ("[A] runs", "[NC] a forest", "[A] eats", "[A] jumps")
    soft = given_masks(6, seed=4)
    ref_noise, ref_cond = inputs(2, 1)
    noise, cond = inputs(4, 2)
    bank, alone = record(pack, sd15, refs, soft[:2], 0.5, ref_noise, ref_cond)
    assert bank.masked and all(t.bits.dtype == torch.bool for t in bank.entries.values())
    read = draw(read_node(host, masked(pack, sd15, panels, soft[2:]), (bank,), panels, pack), noise, cond, STEPS)
    together = draw(masked(pack, sd15, refs + panels, soft, 0.5, refs=2), torch.cat((ref_noise, noise)),
                    torch.cat((ref_cond, cond)), STEPS)
    torch.testing.assert_close(together[:2], alone, atol=1e-5, rtol=0)
    torch.testing.assert_close(together[2:], read, atol=1e-5, rtol=0)
    # the regions act: reading the same bank whole (bits ignored) gives other panels, far beyond the tolerance
    whole = draw(read_node(host, sd15, (bank,), panels, pack, subject_masks=False), noise, cond, STEPS)
    assert (whole - read).abs().max() > 1e-3


@pytest.mark.parametrize("kind", ["sd15", "sdxl"])
def test_two_character_panel_reads_two_banks_by_region(host, pack, request, kind):
    # One reference each, recorded alone at rate 1 (every token, so the union of two banks is what the references
    # in front give): a panel naming A and B routes A's region to A's bank, B's to B's, the rest to neither.
    unet = request.getfixturevalue(kind)
    panels = ("[A] and [B] play", "[B] sleeps", "[NC] a forest", "[A] runs")
    soft = given_masks(6, seed=5)
    (a_noise, b_noise, *_), (a_cond, b_cond, *_) = inputs(2, 3)
    noise, cond = inputs(4, 4)
    bank_a, alone_a = record(pack, unet, ("[A] one",), soft[:1], 1.0, a_noise[None], a_cond[None])
    bank_b, alone_b = record(pack, unet, ("[B] one",), soft[1:2], 1.0, b_noise[None], b_cond[None], name="B")
    model = read_node(host, masked(pack, unet, panels, soft[2:]), (bank_a, bank_b), panels, pack)
    read = draw(model, noise, cond, STEPS)
    together = draw(masked(pack, unet, ("[A] one", "[B] one") + panels, soft, 1.0, refs=2),
                    torch.cat((a_noise[None], b_noise[None], noise)), torch.cat((a_cond[None], b_cond[None], cond)),
                    STEPS)
    # equal up to float32 rounding (masked-out keys against no keys; latents of magnitude ~100; the small SDXL
    # UNet amplifies rounding about 50 times more)
    tol = {"atol": 1e-5, "rtol": 1e-5} if kind == "sd15" else {"atol": 5e-3, "rtol": 1e-3}
    torch.testing.assert_close(together[:2], torch.cat((alone_a, alone_b)), **tol)
    torch.testing.assert_close(together[2:], read, **tol)
    plain = draw(unet, noise, cond, STEPS)
    torch.testing.assert_close(read[2], plain[2], **tol)  # [NC] reads nothing
    assert (read[0] - plain[0]).abs().max() > 100 * tol["atol"]


def test_recorded_bits_are_the_region_membership_of_the_picked_tokens(pack, sd15):
    # Independent: find each recorded token among the layer's input hidden states (a spy patch), then its region
    # from the given masks resized to the layer's grid (test_subject_masks.regions_at), for character A.
    bank_mod, patch = pack("attention.bank"), pack("attention.patch")
    soft = given_masks(2, seed=6)
    csa = masked(pack, sd15, ("[A] one", "[A] two"), soft, 0.5)
    rec = bank_mod.BankRecorder(storage_dtype=torch.float32)
    model = patch.apply_recording(csa, rec)
    seen = {}

    def spy(hidden, context, value, extra):
        step = int(torch.argmin((extra["sample_sigmas"][:-1] - extra["sigmas"].max()).abs()))
        layer = f"{extra['block'][0]}.{extra['block'][1]}.{extra['block_index']}"
        seen[(step, layer)] = (hidden.clone(), list(extra["cond_or_uncond"]))
        return hidden, context, value
    model.set_model_attn1_patch(spy)
    sample(model, 2, steps=STEPS, size=SIZE)
    assert rec.entries and all(t.bits is not None for t in rec.entries.values())
    named = ((0,), (0,))
    inside = outside = 0
    for (step, layer, half), tokens in rec.entries.items():
        hidden, chunks = seen[(step, layer)]
        n = hidden.shape[1]
        member, _ = regions_at(soft, named, n, 0.5)
        pool = hidden[chunks.index(half) * 2:][:2].reshape(2 * n, -1)  # this half's two references, flat
        where = (tokens.hidden[:, None, :] == pool[None]).all(-1).float().argmax(1)
        expected = torch.stack([member[int(f) // n, int(f) % n, 0] for f in where])
        assert torch.equal(tokens.bits, expected), (step, layer, half)
        inside, outside = inside + int(expected.sum()), outside + int((~expected).sum())
    assert inside and outside  # both kinds of token were recorded
    assert rec.estimate == sum(t.nbytes for t in rec.entries.values())  # the estimate counts the bits


def test_saved_bank_keeps_its_bits_and_old_banks_are_refused_under_subject_masks(host, pack, sd15, tmp_path):
    bank_mod, patch = pack("attention.bank"), pack("attention.patch")
    panels = ("[A] runs", "[A] eats")
    soft = given_masks(3, seed=7)
    ref_noise, ref_cond = inputs(1, 8)
    bank, _ = record(pack, sd15, ("[A] one",), soft[:1], 0.5, ref_noise, ref_cond, dtype=torch.float8_e4m3fn)
    loaded = bank_mod.CharacterBank.load(bank.save(tmp_path / "a.safetensors"))
    assert loaded.masked and loaded.entries.keys() == bank.entries.keys() and loaded.size_bytes == bank.size_bytes
    assert all(torch.equal(loaded.entries[k].bits, t.bits) for k, t in bank.entries.items())
    assert "with subject masks" in loaded.summary()
    noise, cond = inputs(2, 9)
    reading = masked(pack, sd15, panels, soft[1:])
    run = lambda b: draw(read_node(host, reading, (b,), panels, pack), noise, cond, STEPS)  # noqa: E731
    assert torch.equal(run(bank), run(loaded))
    # a bank recorded without subject masks (a version 2 file without bits): refused under them, read without them
    old, _ = record_unmasked(pack, sd15)
    old = bank_mod.CharacterBank.load(old.save(tmp_path / "old.safetensors"))
    assert not old.masked
    with pytest.raises(bank_mod.BankMismatchError,
                       match=r"SDN_ReadCharacterBanks: input 'subject_masks': character bank 'A' was recorded "
                             r"without subject masks.*Re-record"):
        read_node(host, reading, (old,), panels, pack)
    with pytest.raises(bank_mod.BankMismatchError, match="recorded without subject masks"):  # the model's CSA
        patch.apply_reading(patch.apply_csa(reading, settings(pack, 0.5)), patch.BankReader((old,)))
    draw(read_node(host, reading, (old,), panels, pack, subject_masks=False), noise, cond, STEPS)


def record_unmasked(pack, model):
    bank_mod, patch = pack("attention.bank"), pack("attention.patch")
    csa = patch.apply_csa(model, patch.CSASettings(rates=((8, 0.5), (16, 0.5), (32, 0.5))))
    rec = bank_mod.BankRecorder(storage_dtype=torch.float16, fingerprint=bank_mod.model_fingerprint(csa))
    out = sample(patch.apply_recording(csa, rec), 1, steps=STEPS, size=SIZE)
    return bank_mod.CharacterBank.from_recorder(rec, "A", ""), out


def test_references_must_name_the_bank_character_alone(host, pack, sd15):
    errors = pack("errors")
    soft = given_masks(2, seed=1)
    noise, cond = inputs(2, 1)
    with pytest.raises(errors.StoryDiffusionError, match=r"SDN_RecordCharacterBank: .*every reference panel must "
                                                         r"name the bank's one character.*\[\['A', 'B'\], \['A'\]\]"):
        record(pack, sd15, ("[A] and [B] play", "[A] one"), soft, 0.5, noise, cond)
    with pytest.raises(errors.StoryDiffusionError, match=r"\[\['A'\], \['B'\]\]"):
        record(pack, sd15, ("[A] one", "[B] one"), soft, 0.5, noise, cond)
    bank_nodes = pack("nodes.bank_nodes")
    model, rec = bank_nodes.RecordCharacterBank.execute(masked(pack, sd15, ("[A] one", "[A] two"), soft, 0.5),
                                                        "fp16", "cpu").result
    samples = draw(model, noise, cond, STEPS)
    with pytest.raises(errors.NodeInputError, match=r"SDN_CharacterBank: input 'name': expected 'A', the character"):
        bank_nodes.CharacterBankNode.execute(rec, {"samples": samples}, "B")
    assert bank_nodes.CharacterBankNode.execute(rec, {"samples": samples}, "A").result[0].masked


def test_masked_reading_adds_no_host_sync_per_layer(host, pack, sd15):
    # Everything is decided once per call (bank regions, slots, routing on the device): reading with subject masks
    # and sharing reads back nothing more than reading the same banks whole on the same mask-recording model.
    from host_syncs import syncs_per_call

    soft = given_masks(2, seed=2)
    noise, cond = inputs(2, 3)
    banks = tuple(record(pack, sd15, (f"[{c}] one",), soft[i:i + 1], 0.5, noise[i:i + 1], cond[i:i + 1], name=c)[0]
                  for i, c in enumerate("AB"))
    panels = ("[A] and [B] play", "[A] runs", "[NC] a forest")
    regions = given_masks(3, seed=9)
    count = lambda m: syncs_per_call(m, 3, kind="sd15", size=SIZE, steps=STEPS)  # noqa: E731
    patch = pack("attention.patch")
    routing = ((0, 1), (0,), ())
    plain = count(patch.apply_reading(masked(pack, sd15, panels, regions), patch.BankReader(banks, routing)))
    reading = patch.apply_reading(masked(pack, sd15, panels, regions, 0.5),
                                  patch.BankReader(banks, routing, share=True, subject_masks=True))
    assert count(reading) == plain


def test_sharing_within_the_batch_routes_bank_and_batch_tokens_as_the_oracle(host, pack, sd15):
    # share_within_batch at rate 1: a query of character c's region sees its own image, c's bank tokens whose bit is
    # set, and every other panel's tokens inside c's region; outside every region of a two-character panel, its
    # own image only. The oracle builds each query's key set token by token (bank tokens projected by the layer).
    from sampling_helpers import mha
    from test_character_banks import projected
    from test_subject_masks import label, with_replace

    soft = given_masks(5, seed=11)
    ref_noise, ref_cond = inputs(2, 12)
    banks = tuple(record(pack, sd15, (f"[{c}] one",), soft[i:i + 1], 1.0, ref_noise[i:i + 1], ref_cond[i:i + 1],
                         name=c)[0] for i, c in enumerate("AB"))
    panels, named = ("[A] and [B] play", "[B] sleeps", "[NC] a forest"), ((0, 1), (1,), ())
    regions = soft[2:]
    model = read_node(host, masked(pack, sd15, panels, regions, 1.0), banks, panels, pack, share=True)

    def replace(q, k, v, extra):
        step = int(torch.argmin((extra["sample_sigmas"][:-1] - extra["sigmas"].max()).abs()))
        layer = f"{extra['block'][0]}.{extra['block'][1]}.{extra['block_index']}"
        chunks, heads, n = extra["cond_or_uncond"], extra["n_heads"], q.shape[1]
        b = q.shape[0] // len(chunks)
        member, value = regions_at(regions, named, n, 0.5)
        out = torch.empty_like(q)
        for ch, half in enumerate(chunks):
            in_region = []  # per character: its bank's keys and values whose bit is set
            for bank in banks:
                bits = bank.entries[(step, layer, half)].bits
                in_region.append([x[bits] for x in projected(sd15, bank, (step, layer, half))])
            for i in range(b):
                row = ch * b + i
                for t in range(n):
                    c = label(i, t, named, member, value)
                    keys, vals = [k[row]], [v[row]]
                    if c is not None:
                        keys.append(in_region[c][0])
                        vals.append(in_region[c][1])
                        for j in range(b):
                            if j != i:
                                keys.append(k[ch * b + j][member[j, :, c]])
                                vals.append(v[ch * b + j][member[j, :, c]])
                    out[row, t] = mha(q[row, t:t + 1], torch.cat(keys), torch.cat(vals), heads)[0]
        return out
    noise, cond = inputs(3, 13)
    got = draw(model, noise, cond, STEPS)
    torch.testing.assert_close(got, draw(with_replace(sd15, replace), noise, cond, STEPS), atol=1e-5, rtol=1e-5)


def test_masked_reading_is_refused_over_other_attn1_patches(pack, sd15):
    # (DiTs read banks with subject masks: tests/test_dit_subject_mask_banks.py)
    bank_mod, patch, errors = pack("attention.bank"), pack("attention.patch"), pack("errors")
    unet_bank = bank_mod.CharacterBank("A", "", {(0, "output.3.0", 0): (torch.randn(4, 8), None, torch.ones(4) > 0)},
                                       (1.0, 0.0), (8, 8), "f" * 32, 1, {})
    other = sd15.clone()
    other.set_model_attn1_replace(lambda q, k, v, extra: q, "output", 3, 0)
    with pytest.raises(errors.UnsupportedModelError, match="input 'subject_masks': .*another attn1 replace"):
        patch.apply_reading(other, patch.BankReader((unet_bank,), subject_masks=True))
    assert patch.apply_reading(other, patch.BankReader((unet_bank,)))  # without masks the patch is chained
