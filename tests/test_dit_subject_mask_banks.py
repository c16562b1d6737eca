"""Character banks with subject masks (issue 10) on small real DiTs (Flux.1, Qwen-Image) through ComfyUI's sampler.

Write phase: a DiT entry keeps the keys then the values (after RoPE) of the references' sampled image tokens
(``2 * R * M`` rows) and ONE region bit per token (``R * M``): does it lie in the region of the character its
reference panel names, at that step. Read phase: an image query of a panel's k-th character sees its own joint
sequence and the keys/values of that character's bank whose bit is set; text queries see their own sequence. The
definition is checked against bank-free reference mode with subject masks, whose DiT routing
tests/test_dit_subject_masks.py checks against a per-query oracle: the references in front of the panels, given
masks, give every panel exactly what reading their banks gives.
"""
import pytest
import torch

from models import small_flux, small_qwen_image
from sampling_helpers import close, mha
from test_dit_banks import draw, latents
from test_dit_csa import TEXT, with_override
from test_subject_mask_banks import read_node, story
from test_subject_masks import given_masks, label, regions_at

SIZE = 8  # latent side: a 4 x 4 grid of image tokens (patch 2), where given_masks' 4 x 4 blocks land exactly


def small(kind):
    return small_flux("flux1") if kind == "flux1" else small_qwen_image(layers=2)


def masked(pack, model, panels, soft, rate=None, refs=0):
    """``model`` (with subject-masked CSA on every block at ``rate`` when given) sampling the story ``panels`` with
    the given soft masks through SDN_CharacterMasks' model."""
    patch, masks = pack("attention.patch"), pack("attention.masks")
    if rate is not None:
        settings = patch.CSASettings(rates=((16, rate),), reference_count=refs, seed=3,
                                     dit_blocks=("double", "single"), subject_masks=True)
        model = patch.apply_csa(model, settings)
    return masks.apply_masks(model, story(pack, *panels), soft)[0]


def record(pack, model, kind, panels, soft, rate, noise, cond, name="A", dtype=torch.float32):
    """Record a bank from the reference ``panels`` (each naming ``name``) drawn alone; returns (bank, latents)."""
    bank_mod, patch = pack("attention.bank"), pack("attention.patch")
    csa = masked(pack, model, panels, soft, rate)
    rec = bank_mod.BankRecorder(storage_dtype=dtype, fingerprint=bank_mod.model_fingerprint(csa),
                                settings=patch.csa_settings_of(csa).as_dict())
    out = draw(patch.apply_recording(csa, rec), kind, noise, cond)
    assert rec.subject == name
    return bank_mod.CharacterBank.from_recorder(rec, name, ""), out


def inputs(kind, count, seed):
    gen = torch.Generator().manual_seed(seed)
    return latents(kind, count, gen, SIZE), torch.randn(count, TEXT, 32, generator=gen)


def padded(model, real=3):
    """``model`` with the text-padding mask current ComfyUI gives Qwen-Image (additive ``[rows, 1, N]``: text keys
    from ``real`` on hidden) in every attention call, under every override already there (CSA, masks, reading)."""
    m = model.clone()
    options = m.model_options.setdefault("transformer_options", {})
    inner = options["optimized_attention_override"]

    def override(func, q, k, v, heads, *args, **kwargs):
        args, kwargs = args[1:], {key: value for key, value in kwargs.items() if key != "mask"}
        mask = torch.zeros(q.shape[0], 1, k.shape[2])
        mask[:, :, real:TEXT] = -torch.finfo(torch.float32).max
        return inner(func, q, k, v, heads, *args, mask=mask, **kwargs)
    options["optimized_attention_override"] = override
    return m


@pytest.mark.parametrize("kind, padding", [("flux1", False), ("qwen", False), ("qwen", True)])
def test_reading_equals_reference_mode_with_subject_masks(host, pack, kind, padding):
    # Two references of A recorded together at rate 0.5 (they share among themselves, masked), then panels naming
    # A or nobody ([NC]). Against: the references in front of the panels, CSA with reference_count 2 and subject
    # masks, the same given masks (with padding: the same text-padding mask, which the read's image queries still
    # obey on their own row's text keys).
    refs, panels = ("[A] one", "[A] two"), ("[A] runs", "[NC] a forest", "[A] eats")
    model = small(kind)
    soft = given_masks(5, seed=4)
    ref_noise, ref_cond = inputs(kind, 2, 1)
    noise, cond = inputs(kind, 3, 2)
    pad = padded if padding else (lambda m: m)
    recording = masked(pack, model, refs, soft[:2], 0.5)
    bank_mod, patch = pack("attention.bank"), pack("attention.patch")
    rec = bank_mod.BankRecorder(storage_dtype=torch.float32, fingerprint=bank_mod.model_fingerprint(recording))
    alone = draw(pad(patch.apply_recording(recording, rec)), kind, ref_noise, ref_cond)
    bank = bank_mod.CharacterBank.from_recorder(rec, "A", "")
    assert bank.masked and bank.kind == "dit"
    for tokens in bank.entries.values():  # keys and values: 2 * R * M rows, one bit a token
        assert tokens.bits.dtype == torch.bool and tokens.hidden.shape[0] == 2 * tokens.bits.shape[0] == 2 * 2 * 8
    read = draw(pad(read_node(host, masked(pack, model, panels, soft[2:]), (bank,), panels, pack)), kind, noise, cond)
    together = draw(pad(masked(pack, model, refs + panels, soft, 0.5, refs=2)), kind, torch.cat((ref_noise, noise)),
                    torch.cat((ref_cond, cond)))
    # equal up to float32 rounding (other batch sizes; [NC]: masked-out keys against no keys; latents up to ~100)
    close(together[:2], alone)
    close(together[2:], read)
    # the regions act: reading the same bank whole (bits ignored) gives other panels, far beyond the tolerance
    whole = draw(pad(read_node(host, model, (bank,), panels, pack, subject_masks=False)), kind, noise, cond)
    assert (whole - read).abs().max() > 0.1
    if padding:  # and the padding mask acts
        assert (draw(read_node(host, masked(pack, model, panels, soft[2:]), (bank,), panels, pack), kind, noise,
                     cond) - read).abs().max() > 0.1


@pytest.mark.parametrize("kind", ["flux1", "qwen"])
def test_two_character_panel_reads_two_banks_by_region(host, pack, kind):
    # One reference each, recorded alone at rate 1 (every image token, so the union of two banks is what the
    # references in front give): a panel naming A and B routes A's region to A's bank, B's to B's, the rest to
    # neither; text queries read nothing.
    model = small(kind)
    panels = ("[A] and [B] play", "[B] sleeps", "[NC] a forest", "[A] runs")
    soft = given_masks(6, seed=5)
    ref_noise, ref_cond = inputs(kind, 2, 3)
    noise, cond = inputs(kind, 4, 4)
    bank_a, alone_a = record(pack, model, kind, ("[A] one",), soft[:1], 1.0, ref_noise[:1], ref_cond[:1])
    bank_b, alone_b = record(pack, model, kind, ("[B] one",), soft[1:2], 1.0, ref_noise[1:], ref_cond[1:], name="B")
    read = draw(read_node(host, masked(pack, model, panels, soft[2:]), (bank_a, bank_b), panels, pack), kind, noise,
                cond)
    together = draw(masked(pack, model, ("[A] one", "[B] one") + panels, soft, 1.0, refs=2), kind,
                    torch.cat((ref_noise, noise)), torch.cat((ref_cond, cond)))
    # equal up to float32 rounding (other batch sizes, masked-out keys against no keys, the tokens in another order)
    close(together[:2], torch.cat((alone_a, alone_b)))
    close(together[2:], read)
    plain = draw(model, kind, noise, cond)
    close(read[2], plain[2])  # [NC] reads nothing
    assert (read[0] - plain[0]).abs().max() > 0.1


def test_sharing_within_the_batch_routes_bank_and_batch_tokens_as_the_oracle(host, pack):
    # share_within_batch at rate 1 on Flux.1 (a double- and a single-stream block): an image query of character c's
    # region sees its own joint sequence, c's bank keys/values whose bit is set, and every other panel's image tokens
    # inside c's region; outside every region of a two-character panel, and every text query, its own sequence only.
    # The oracle builds each query's key set token by token.
    model = small_flux("flux1")
    soft = given_masks(5, seed=11)
    ref_noise, ref_cond = inputs("flux1", 2, 12)
    banks = tuple(record(pack, model, "flux1", (f"[{c}] one",), soft[i:i + 1], 1.0, ref_noise[i:i + 1],
                         ref_cond[i:i + 1], name=c)[0] for i, c in enumerate("AB"))
    panels, named, regions = ("[A] and [B] play", "[B] sleeps", "[NC] a forest"), ((0, 1), (1,), ()), soft[2:]
    reading = read_node(host, masked(pack, model, panels, regions, 1.0), banks, panels, pack, share=True)

    def oracle(func, q, k, v, heads, *args, **kwargs):
        opts = kwargs["transformer_options"]
        step = int(torch.argmin((opts["sample_sigmas"][:-1] - opts["sigmas"].max()).abs()))
        block, chunks = f"{opts['block_type']}.{opts['block_index']}", list(opts["cond_or_uncond"])
        rows, h, n, d = q.shape
        b = rows // len(chunks)
        member, value = regions_at(regions, named, n - TEXT, 0.5, (SIZE // 2, SIZE // 2))
        flat = lambda t: t.transpose(0, 1).reshape(n, h * d)  # noqa: E731  [h, n, d] -> [n, h*d]
        out = torch.empty(rows, n, h * d)
        for row in range(rows):
            chunk, i = divmod(row, b)
            in_region = []  # per character: its bank's keys and values (after RoPE) whose bit is set
            for bank in banks:
                tokens = bank.entries[(step, block, chunks[chunk])]
                m = tokens.bits.shape[0]
                in_region.append((tokens.hidden[:m][tokens.bits], tokens.hidden[m:][tokens.bits]))
            out[row, :TEXT] = mha(flat(q[row])[:TEXT], flat(k[row]), flat(v[row]), h)
            for t in range(n - TEXT):
                c = label(i, t, named, member, value)
                keys, vals = [flat(k[row])], [flat(v[row])]
                if c is not None:
                    keys.append(in_region[c][0])
                    vals.append(in_region[c][1])
                    for j in range(b):
                        if j != i:
                            keys.append(flat(k[chunk * b + j])[TEXT:][member[j, :, c]])
                            vals.append(flat(v[chunk * b + j])[TEXT:][member[j, :, c]])
                out[row, TEXT + t] = mha(flat(q[row])[TEXT + t:TEXT + t + 1], torch.cat(keys), torch.cat(vals), h)[0]
        return out
    noise, cond = inputs("flux1", 3, 13)
    got = draw(reading, "flux1", noise, cond)
    close(got, draw(with_override(model, oracle), "flux1", noise, cond))
    unshared = draw(read_node(host, masked(pack, model, panels, regions), banks, panels, pack), "flux1", noise, cond)
    assert (got - unshared).abs().max() > 0.1  # the batch's tokens count


def spy_keys(seen):
    """An attention override recording, per (step, block), the keys ``[rows, heads, N, D]`` of the calls over the
    model's own joint sequences (CSA's calls over extended keys pass by), with the call's cond_or_uncond."""
    def override(func, q, k, v, heads, *args, **kwargs):
        opts = kwargs["transformer_options"]
        if k.shape[2] == TEXT + (SIZE // 2) ** 2:
            step = int(torch.argmin((opts["sample_sigmas"][:-1] - opts["sigmas"].max()).abs()))
            seen[(step, f"{opts['block_type']}.{opts['block_index']}")] = (k.clone(), list(opts["cond_or_uncond"]))
        return func(q, k, v, heads, *args, **kwargs)
    return override


def test_recorded_bits_are_the_region_membership_of_the_picked_tokens(host, pack):
    # Independent: find each recorded key among the block's image keys (a spy override under CSA), then its region
    # from the given masks resized to the 4 x 4 token grid (test_subject_masks.regions_at), for character A; the
    # values are the same tokens' values.
    bank_mod, patch = pack("attention.bank"), pack("attention.patch")
    soft = given_masks(2, seed=6)
    seen = {}
    csa = masked(pack, with_override(small_flux("flux1"), spy_keys(seen)), ("[A] one", "[A] two"), soft, 0.5)
    rec = bank_mod.BankRecorder(storage_dtype=torch.float32)
    draw(patch.apply_recording(csa, rec), "flux1", *inputs("flux1", 2, 7))
    assert rec.entries and all(t.bits is not None for t in rec.entries.values())
    n = (SIZE // 2) ** 2
    member, _ = regions_at(soft, ((0,), (0,)), n, 0.5, (SIZE // 2, SIZE // 2))
    inside = outside = 0
    for (step, block, half), tokens in rec.entries.items():
        k, chunks = seen[(step, block)]
        pool = k[chunks.index(half) * 2:][:2, :, TEXT:].transpose(1, 2).reshape(2 * n, -1)  # this half's references
        m = tokens.bits.shape[0]
        keys = tokens.hidden[:m]
        where = (keys[:, None, :] == pool[None]).all(-1).float().argmax(1)
        assert torch.equal(pool[where], keys), (step, block, half)
        expected = torch.stack([member[int(f) // n, int(f) % n, 0] for f in where])
        assert torch.equal(tokens.bits, expected), (step, block, half)
        inside, outside = inside + int(expected.sum()), outside + int((~expected).sum())
    assert inside and outside  # both kinds of token were recorded
    assert rec.estimate == sum(t.nbytes for t in rec.entries.values())  # the estimate counts one bit a token


def test_no_host_syncs_in_the_blocks(host, pack):
    # Everything is decided once per model call (bank regions, slots, routing on the device): the attention calls
    # of a masked, sharing, two-bank reading (one call per slot) read nothing back from the device.
    from host_syncs import HostSyncs

    patch = pack("attention.patch")
    model = small_flux("flux1", depth=2, single=2)
    soft = given_masks(5, seed=2)
    noise, cond = inputs("flux1", 2, 3)
    banks = tuple(record(pack, model, "flux1", (f"[{c}] one",), soft[i:i + 1], 0.5, noise[i:i + 1], cond[i:i + 1],
                         name=c)[0] for i, c in enumerate("AB"))
    panels = ("[A] and [B] play", "[A] runs", "[NC] a forest")
    reading = patch.apply_reading(masked(pack, model, panels, soft[2:], 0.5),
                                  patch.BankReader(banks, ((0, 1), (0,), ()), share=True, subject_masks=True))
    options = reading.model_options["transformer_options"]
    inner, counts = options["optimized_attention_override"], []

    def counted(*args, **kwargs):
        with HostSyncs() as syncs:
            out = inner(*args, **kwargs)
        counts.append(syncs.count)
        return out
    options["optimized_attention_override"] = counted
    got = draw(reading, "flux1", *inputs("flux1", 3, 4))
    assert len(counts) == 2 * 4 and sum(counts) == 0, counts  # 2 steps x 4 blocks, one call each (cfg 3: 2 chunks)
    assert (got - draw(model, "flux1", *inputs("flux1", 3, 4))).abs().max() > 0.1


def test_saved_dit_bank_keeps_its_bits_and_banks_without_bits_are_refused(host, pack, tmp_path):
    bank_mod, patch = pack("attention.bank"), pack("attention.patch")
    model = small_flux("flux1")
    panels = ("[A] runs", "[A] eats")
    soft = given_masks(3, seed=7)
    bank, _ = record(pack, model, "flux1", ("[A] one",), soft[:1], 0.5, *inputs("flux1", 1, 8),
                     dtype=torch.float8_e4m3fn)
    loaded = bank_mod.CharacterBank.load(bank.save(tmp_path / "a.safetensors"))
    assert loaded.masked and loaded.kind == "dit" and loaded.entries.keys() == bank.entries.keys()
    assert all(torch.equal(loaded.entries[k].bits, t.bits) for k, t in bank.entries.items())
    noise, cond = inputs("flux1", 2, 9)
    reading = masked(pack, model, panels, soft[1:])
    run = lambda b: draw(read_node(host, reading, (b,), panels, pack), "flux1", noise, cond)  # noqa: E731
    assert torch.equal(run(bank), run(loaded))
    # a DiT bank recorded without subject masks: refused under them (the read node's input or the model's CSA)
    old = bank_mod.BankRecorder(storage_dtype=torch.float16)
    csa = patch.apply_csa(model, patch.CSASettings(rates=((16, 0.5),), dit_blocks=("double", "single")))
    draw(patch.apply_recording(csa, old), "flux1", *inputs("flux1", 1, 8))
    old = bank_mod.CharacterBank.from_recorder(old, "A", "")
    assert not old.masked and old.kind == "dit"
    with pytest.raises(bank_mod.BankMismatchError,
                       match=r"SDN_ReadCharacterBanks: input 'subject_masks': character bank 'A' was recorded "
                             r"without subject masks.*Re-record"):
        patch.apply_reading(reading, patch.BankReader((old,), subject_masks=True))
    with pytest.raises(bank_mod.BankMismatchError, match="recorded without subject masks"):
        patch.apply_reading(masked(pack, model, panels, soft[1:], 0.5), patch.BankReader((old,)))
    draw(patch.apply_reading(reading, patch.BankReader((old,))), "flux1", noise, cond)
