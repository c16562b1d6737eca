"""Character banks (write/read protocol) through ComfyUI's real sampler on a real SD1.5 block layout.

The read oracle is written here: it looks the bank entry up by (step from sample_sigmas, layer key, CFG half)
and attends over own tokens + exactly those tokens.
"""
import pytest
import torch

from models import small_unet
from sampling_helpers import close, csa_model, mha, sample, with_oracle


@pytest.fixture(scope="module")
def api(pack):
    bank, patch = pack("attention.bank"), pack("attention.patch")
    return bank, patch


def record(api, model, pack, refs=2, seed=0, rate=0.5, steps=2, positive_seed=0, dtype=torch.float16, size=16,
           name=None):
    bank_mod, patch = api
    csa = csa_model(pack, model, rate=rate, seed=seed)
    rec = bank_mod.BankRecorder(storage_dtype=dtype, fingerprint=bank_mod.model_fingerprint(csa),
                                settings=patch.csa_settings_of(csa).as_dict())
    gen = torch.Generator().manual_seed(positive_seed)
    positive = [[torch.randn(refs, 77, 64, generator=gen), {}]]
    out = sample(patch.apply_recording(csa, rec), refs, steps=steps, positive=positive, size=size)
    return bank_mod.CharacterBank.from_recorder(rec, name or f"char{positive_seed}", "desc"), out


def attn1(model, layer):
    """The attention module of bank layer ``layer`` ("output.5.0"): its to_k/to_v project the bank's hidden states."""
    block, number, depth = layer.split(".")
    return model.get_model_object(f"diffusion_model.{block}_blocks.{number}.1.transformer_blocks.{depth}.attn1")


def projected(model, bank, key):
    """Keys and values (fp32) of a bank entry: its hidden states (dequantised) through the layer's to_k/to_v."""
    hidden, scale = bank.entries[key][:2]
    hidden = hidden.float() if scale is None else hidden.float() * scale
    module = attn1(model, key[1])
    return module.to_k(hidden), module.to_v(hidden)


def bank_oracle(model, banks, routing=None):
    def replace(q, k, v, extra):
        sched = extra["sample_sigmas"][:-1]
        step = int(torch.argmin((sched - extra["sigmas"].max()).abs()))
        block, depth = extra["block"], extra["block_index"]
        layer = f"{block[0]}.{block[1]}.{depth}"
        chunks = extra["cond_or_uncond"]
        b = q.shape[0] // len(chunks)
        out = torch.empty_like(q)
        for ch, half in enumerate(chunks):
            for i in range(b):
                row = ch * b + i
                chosen = banks if routing is None else [banks[j] for j in routing[i]]
                kv = [projected(model, bk, (step, layer, half)) for bk in chosen if (step, layer, half) in bk.entries]
                ek, ev = [e[0] for e in kv], [e[1] for e in kv]
                out[row] = mha(q[row], torch.cat([k[row]] + ek), torch.cat([v[row]] + ev), extra["n_heads"])
        return out
    return replace


def oracle_model(model, layers, banks, routing=None):
    m = model.clone()
    for name in layers:
        block, number, depth = name.split(".")
        m.set_model_attn1_replace(bank_oracle(model, banks, routing), block, int(number), int(depth))
    return m


def test_recorded_tokens_are_reference_tokens_of_that_step_and_layer(api, pack, sd15):
    bank_mod, patch = api
    csa = csa_model(pack, sd15, rate=0.5, seed=4)
    rec = bank_mod.BankRecorder(storage_dtype=torch.float32)
    rec_model = patch.apply_recording(csa, rec)
    seen = {}

    def spy(hidden, context, value, extra):  # the layer's input before its projections, as the bank keeps it
        if (extra["block"], extra["block_index"]) == (("output", 5), 0):
            step = int(torch.argmin((extra["sample_sigmas"][:-1] - extra["sigmas"].max()).abs()))
            seen[step] = (hidden.clone(), list(extra["cond_or_uncond"]))
        return hidden, context, value
    rec_model.set_model_attn1_patch(spy)
    sample(rec_model, 3, steps=3)
    assert rec.reference_count == 3 and len(seen) == 3
    for step, (hidden, chunks) in seen.items():
        n = hidden.shape[1]
        for g, half in enumerate(chunks):
            entry = rec.entries[(step, "output.5.0", half)].hidden
            m = round(0.5 * n)
            assert entry.shape == (3 * m, hidden.shape[2])
            pool = hidden[g * 3:(g + 1) * 3]  # this half's 3 reference images
            for i in range(3):  # M distinct tokens of each reference image, in image order
                block = entry[i * m:(i + 1) * m]
                hits = (block[:, None, :] == pool[i][None]).all(-1)
                assert hits.any(1).all() and len(set(hits.float().argmax(1).tolist())) == m
    steps = {s for (s, _, _) in rec.entries}
    assert steps == {0, 1, 2} and rec.schedule and rec.latent_hw == (16, 16)


def test_read_equals_own_tokens_plus_recorded_bank(api, pack, sd15):
    bank, _ = record(api, sd15, pack, refs=2, steps=3)
    _, patch = api
    reader = patch.apply_reading(sd15, patch.BankReader((bank,)))
    out = sample(reader, 3, steps=3)
    close(out, sample(oracle_model(sd15, bank.layers, [bank]), 3, steps=3))
    assert not torch.allclose(out, sample(sd15, 3, steps=3))


def test_identical_seeds_record_identical_banks(api, pack, sd15):
    a, out_a = record(api, sd15, pack, seed=7)
    b, out_b = record(api, sd15, pack, seed=7)
    c, _ = record(api, sd15, pack, seed=8)
    assert torch.equal(out_a, out_b)
    assert a.entries.keys() == b.entries.keys()
    assert all(torch.equal(a.entries[k].hidden, b.entries[k].hidden) and a.entries[k].scale is b.entries[k].scale
               is None for k in a.entries)
    assert any(not torch.equal(a.entries[k][0], c.entries[k][0]) for k in a.entries)


def test_saved_and_loaded_bank_gives_identical_panels(api, pack, sd15, tmp_path):
    bank_mod, patch = api
    bank, _ = record(api, sd15, pack)
    path = bank.save(tmp_path / "char.safetensors")
    loaded = bank_mod.CharacterBank.load(path)
    assert (loaded.name, loaded.description, loaded.schedule, loaded.latent_hw, loaded.fingerprint) == \
        (bank.name, bank.description, bank.schedule, bank.latent_hw, bank.fingerprint)
    assert loaded.settings == bank.settings and loaded.size_bytes == bank.size_bytes
    run = lambda b: sample(patch.apply_reading(sd15, patch.BankReader((b,))), 2)  # noqa: E731
    assert torch.equal(run(bank), run(loaded))


def test_bad_bank_files_are_refused(api, tmp_path):
    bank_mod, _ = api
    import comfy.utils
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not a safetensors file")
    with pytest.raises(bank_mod.BankFileError, match="junk.safetensors"):
        bank_mod.CharacterBank.load(junk)
    other = tmp_path / "other.safetensors"
    comfy.utils.save_torch_file({"x": torch.zeros(1)}, str(other), metadata={"format": "something-else"})
    with pytest.raises(bank_mod.BankFileError, match="not a character bank"):
        bank_mod.CharacterBank.load(other)


def test_mismatched_schedule_and_resolution_are_refused(api, pack, sd15):
    bank_mod, patch = api
    bank, _ = record(api, sd15, pack, steps=2)
    reader = patch.apply_reading(sd15, patch.BankReader((bank,)))
    with pytest.raises(bank_mod.BankMismatchError, match="2-step schedule.*3 steps"):
        sample(reader, 2, steps=3)
    with pytest.raises(bank_mod.BankMismatchError, match="latent size 16x16"):
        sample(reader, 2, steps=2, size=24)


def test_other_model_is_refused_by_the_read_node(api, pack, sd15, host):
    bank, _ = record(api, sd15, pack)
    node = host.node_class("SDN_ReadCharacterBanks")
    errors = pack("errors")
    other = small_unet("sd15", seed=1)
    with pytest.raises(errors.NodeInputError, match="recorded with another one"):
        node.execute(other, bank, False)
    lora_like = sd15.clone()
    key = next(k for k in sd15.model.state_dict() if k.endswith("attn1.to_q.weight"))
    lora_like.add_patches({key: (torch.zeros_like(sd15.model.state_dict()[key]),)}, 0.5)
    with pytest.raises(errors.NodeInputError, match="recorded with another one"):
        node.execute(lora_like, bank, False)
    assert node.execute(sd15, bank, False)  # the recording model itself is accepted


def test_two_character_routing_reads_both_banks_and_nc_none(api, pack, sd15, host):
    _, patch = api
    ann, _ = record(api, sd15, pack, positive_seed=1, name="Ann")
    bob, _ = record(api, sd15, pack, positive_seed=2, name="Bob")
    parser = pack("story.parser")
    story = parser.parse_story("[Ann] a girl\n[Bob] a dog\n---\n[Ann] runs\n[Ann] and [Bob] play\n[NC] a tree\n[Bob] sleeps")
    model = host.node_class("SDN_ReadCharacterBanks").execute(sd15, ann, False, bank_2=bob, story=story)[0]
    routing = [(0,), (0, 1), (), (1,)]
    out = sample(model, 4)
    close(out, sample(oracle_model(sd15, ann.layers, [ann, bob], routing), 4))
    nc = sample(sd15, 4)[2]
    close(out[2], nc)  # the [NC] panel reads nothing: exactly the unpatched model's panel


def test_read_with_sharing_within_batch(api, pack, sd15):
    _, patch = api
    bank, _ = record(api, sd15, pack, rate=1.0)
    csa = csa_model(pack, sd15, rate=1.0)
    model = patch.apply_reading(csa, patch.BankReader((bank,), share=True))

    def shared(q, k, v, extra):  # own + bank + all other read images (rate 1)
        sched = extra["sample_sigmas"][:-1]
        step = int(torch.argmin((sched - extra["sigmas"].max()).abs()))
        layer = f"{extra['block'][0]}.{extra['block'][1]}.{extra['block_index']}"
        chunks = extra["cond_or_uncond"]
        b = q.shape[0] // len(chunks)
        out = torch.empty_like(q)
        for ch, half in enumerate(chunks):
            rows = list(range(ch * b, ch * b + b))
            bk, bv = projected(sd15, bank, (step, layer, half))
            for row in rows:
                others = [r for r in rows if r != row]
                kk = torch.cat([k[row], bk] + [k[r] for r in others])
                vv = torch.cat([v[row], bv] + [v[r] for r in others])
                out[row] = mha(q[row], kk, vv, extra["n_heads"])
        return out
    ref = sd15.clone()
    for name in bank.layers:
        b_, n_, d_ = name.split(".")
        ref.set_model_attn1_replace(shared, b_, int(n_), int(d_))
    close(sample(model, 3), sample(ref, 3))


def test_sliding_window_limits_partners(pack, sd15):
    csa = pack("attention.csa")
    assert csa.window_sources(6, 3) == [[1, 2], [0, 2], [1, 3], [2, 4], [3, 5], [3, 4]]
    p = csa.make_plan(6, 10, 1.0, 0, torch.Generator().manual_seed(0), tile_size=3)
    assert p.all_idx.shape == (6, 20)
    assert set((p.all_idx[0] // 10).tolist()) == {1, 2} and set((p.all_idx[5] // 10).tolist()) == {3, 4}

    def partners(i, b):
        return csa.window_sources(b, 3)[i]
    close(sample(csa_model(pack, sd15, tile_size=3), 5), sample(with_oracle(sd15, partners=partners), 5))
    # A window covering the whole batch is plain all-to-all CSA.
    close(sample(csa_model(pack, sd15, tile_size=5, rate=0.5), 5), sample(csa_model(pack, sd15, rate=0.5), 5))


def test_bank_nodes_errors_through_the_executor(host):
    import sdn_host

    prompt = {
        "1": {"class_type": "SDNTest_TinyCheckpoint", "inputs": {"kind": "sd15", "seed": 0}},
        "2": {"class_type": "SDN_RecordCharacterBank", "inputs": {"model": ["1", 0], "storage_dtype": "fp16",
                                                                  "storage_device": "cpu"}},
        "3": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "4": {"class_type": "SDN_CharacterBank", "inputs": {"recorder": ["2", 1], "samples": ["3", 0], "name": "A"}},
        "5": {"class_type": "PreviewAny", "inputs": {"source": ["4", 1]}},
    }
    with pytest.raises(sdn_host.WorkflowError, match="SDN_RecordCharacterBank: input 'model': expected a model patched"):
        host.run(prompt)


def test_fingerprint_ignores_weights_patched_in_place_by_sampling(api, sd15):
    # ComfyUI applies LoRA-style weight patches in place while a model is loaded: the fingerprint must describe
    # the model (base weights + patches), not its loaded state, or a read after sampling would be refused.
    bank_mod, _ = api
    lora_like = sd15.clone()
    key = next(k for k in sd15.model.state_dict() if k.endswith("attn1.to_k.weight"))
    lora_like.add_patches({key: (torch.ones_like(sd15.model.state_dict()[key]),)}, 0.5)
    before = bank_mod.model_fingerprint(lora_like)
    sample(lora_like, 2, steps=1)
    assert bank_mod.model_fingerprint(lora_like) == before
    assert bank_mod.model_fingerprint(sd15) != before


def with_lora(model, seed, strength=1.0, rank=4):
    """LoraLoader's path: a LoRA (kohya key names, random weights) through comfy.sd.load_lora_for_models."""
    import comfy.lora
    import comfy.sd

    sd = model.model.state_dict()
    gen = torch.Generator().manual_seed(seed)
    lora = {}
    for name, key in comfy.lora.model_lora_keys_unet(model.model, {}).items():
        if name.startswith("lora_unet_") and key.endswith(("attn1.to_k.weight", "attn1.to_v.weight")):
            out_features, in_features = sd[key].shape
            lora[f"{name}.lora_up.weight"] = torch.randn(out_features, rank, generator=gen) * 0.05
            lora[f"{name}.lora_down.weight"] = torch.randn(rank, in_features, generator=gen) * 0.05
            lora[f"{name}.alpha"] = torch.tensor(float(rank))
    return comfy.sd.load_lora_for_models(model, None, lora, strength, 0.0)[0]


def test_bank_recorded_under_one_lora_is_refused_under_another(api, pack, sd15, host):
    import comfy.model_management

    node = host.node_class("SDN_ReadCharacterBanks")
    errors = pack("errors")
    bank, _ = record(api, with_lora(sd15, seed=1), pack)
    # another LoRA with the same keys and strength: refused
    with pytest.raises(errors.NodeInputError, match="recorded with another one"):
        node.execute(with_lora(sd15, seed=2), bank, False)
    # the same LoRA loaded again (new tensors, same content): accepted, whether or not ComfyUI has applied its
    # weights in place (originals in the patcher's backup) or left them to be applied later
    again = with_lora(sd15, seed=1)
    comfy.model_management.unload_all_models()
    assert not again.backup
    assert node.execute(again, bank, False)
    comfy.model_management.load_models_gpu([again])
    assert again.backup and again.model.current_weight_patches_uuid == again.patches_uuid
    assert node.execute(again, bank, False)
    with pytest.raises(errors.NodeInputError, match="recorded with another one"):
        node.execute(with_lora(sd15, seed=2), bank, False)


@pytest.mark.parametrize("form", ["tensor", "diff", "lora"])
def test_fingerprint_covers_the_content_of_every_patch_form(api, sd15, form):
    # ComfyUI's weight patch data: a bare tensor, ("diff", (tensor,)), ("lora", (up, down, alpha, ...)) on
    # older hosts (weight adapter objects with .weights on current ones: the LoRA loader test above).
    bank_mod, _ = api
    key = next(k for k in sd15.model.state_dict() if k.endswith("attn1.to_v.weight"))
    shape = sd15.model.state_dict()[key].shape

    def patched(seed):
        gen = torch.Generator().manual_seed(seed)
        up, down = torch.randn(shape[0], 2, generator=gen), torch.randn(2, shape[1], generator=gen)
        data = {"tensor": (up @ down,), "diff": ("diff", (up @ down,)),
                "lora": ("lora", (up, down, 2.0, None, None, None))}[form]
        m = sd15.clone()
        m.add_patches({key: data}, 0.5)
        return m
    fingerprint = bank_mod.model_fingerprint
    assert fingerprint(patched(1)) == fingerprint(patched(1)) != fingerprint(patched(2))


def test_recording_and_reading_with_current_comfyui_clone(api, pack, sd15, monkeypatch):
    # ComfyUI since Feb 2026: ModelPatcher.clone() copies the dicts and lists of model_options and shares every
    # other object (patch objects included) instead of deep-copying them. Banks and CSA must not depend on either.
    import copy
    import types

    import comfy.model_patcher

    def dicts_and_lists(value):
        if isinstance(value, dict):
            return {k: dicts_and_lists(v) for k, v in value.items()}
        if isinstance(value, list):
            return [dicts_and_lists(v) for v in value]
        return value
    bank, out = record(api, sd15, pack, steps=2)
    _, patch = api
    read = sample(patch.apply_reading(sd15, patch.BankReader((bank,))), 2)
    if hasattr(comfy.model_patcher, "copy"):  # a host whose clone deep-copies (0.3.75): make it share
        monkeypatch.setattr(comfy.model_patcher, "copy",
                            types.SimpleNamespace(deepcopy=dicts_and_lists, copy=copy.copy))
    shared_bank, shared_out = record(api, sd15, pack, steps=2)
    assert torch.equal(shared_out, out) and shared_bank.entries.keys() == bank.entries.keys()
    assert all(torch.equal(shared_bank.entries[k][0], bank.entries[k][0]) for k in bank.entries)
    assert torch.equal(sample(patch.apply_reading(sd15, patch.BankReader((shared_bank,))), 2), read)


def test_read_node_names_the_inputs_that_collide(api, pack, sd15, host):
    node = host.node_class("SDN_ReadCharacterBanks")
    errors = pack("errors")
    mira, _ = record(api, sd15, pack, name="Mira")
    bo, _ = record(api, sd15, pack, positive_seed=1, name="Bo")
    again, _ = record(api, sd15, pack, positive_seed=2, name="Mira")
    with pytest.raises(errors.NodeInputError) as info:
        node.execute(sd15, mira, False, bank_2=bo, bank_3=again)
    assert info.value.input_name == "bank_3"
    assert "'bank' and 'bank_3'" in str(info.value) and "'Mira'" in str(info.value)
    # a gap among the optional inputs: the foreign bank is the one in bank_3, not the second connected one
    foreign, _ = record(api, small_unet("sd15", seed=1), pack, name="Zed\u200b")
    with pytest.raises(errors.NodeInputError) as info:
        node.execute(sd15, mira, False, bank_3=foreign)
    assert info.value.input_name == "bank_3" and r"'Zed\u200b'" in str(info.value)


def test_bank_of_another_architecture_is_refused_when_read(api, pack, sd15):
    # An SD1.5 bank read by an SDXL model: layers such as output.9.0 do not exist there; reading used to
    # silently leave them out.
    bank_mod, patch = api
    bank, _ = record(api, sd15, pack)
    with pytest.raises(bank_mod.BankMismatchError,
                       match=r"SDN_ReadCharacterBanks: .*layer output\.\d+\.0, which this model does not have"):
        patch.apply_reading(small_unet("sdxl"), patch.BankReader((bank,)))


def test_bank_keeps_hidden_states_of_the_sampled_tokens_as_the_reference_app(api, pack, sd15):
    # The reference app keeps, per step, layer and CFG half, the layer's input (hidden states) of the sampled
    # reference tokens: R x M x C values. The bank holds exactly that (before: projected keys AND values, 2x).
    bank, _ = record(api, sd15, pack, refs=2, steps=2, dtype=torch.float16)
    for (step, layer, half), tokens in bank.entries.items():
        channels = attn1(sd15, layer).to_k.in_features
        number = int(layer.split(".")[1])  # a 16x16 latent: output 3-5 at 1/32 (4x4), 6-8 at 1/16, 9-11 at 1/8
        m = round(0.5 * (16 if number < 6 else 64 if number < 9 else 256))
        assert tokens.hidden.shape == (2 * m, channels) and tokens.scale is None
        assert tokens.nbytes == 2 * m * channels * 2
    assert bank.size_bytes == sum(t.hidden.numel() * 2 for t in bank.entries.values())
    assert {key[2] for key in bank.entries} == {0, 1} and {key[0] for key in bank.entries} == {0, 1}


def test_storydiffusion_schedule_records_only_what_is_read(api, pack, sd15):
    # The reference app's schedule never uses step 0 and skips some layer calls: nothing is kept for them.
    bank_mod, patch = api
    context = pack("attention.context")
    csa = csa_model(pack, sd15, rate=0.5, seed=5, schedule="storydiffusion")
    rec = bank_mod.BankRecorder()
    sample(patch.apply_recording(csa, rec), 2, steps=4)
    expected = {(step, f"output.{n}.0", half) for step in range(4) for n in range(3, 12) for half in (0, 1)
                if context.gate_open(5, step, ("output", n, 0))}
    assert set(rec.entries) == expected and not any(key[0] == 0 for key in expected)
    assert len(expected) < 3 * 9 * 2  # some layer calls of steps 1..3 were skipped too


def test_fp8_bank_stays_within_the_variation_of_the_token_draw(api, pack, sd15):
    # fp8 (e4m3, one scale per token) halves the bank again. Its effect on the read panels, against fp16, must be a
    # small part of how much the panels change when CSA draws other tokens (another seed): a difference no user
    # can prefer one way or the other. Measured: ~15% here (SD1.5 layout), ~3% on the SDXL layout.
    bank_mod, patch = api
    fp16, _ = record(api, sd15, pack, seed=1, steps=3, dtype=torch.float16)
    other_draw, _ = record(api, sd15, pack, seed=2, steps=3, dtype=torch.float16)
    fp8, _ = record(api, sd15, pack, seed=1, steps=3, dtype=torch.float8_e4m3fn)
    read = lambda b: sample(patch.apply_reading(sd15, patch.BankReader((b,))), 3, steps=3)  # noqa: E731
    out16, out8, out_other = read(fp16), read(fp8), read(other_draw)
    assert (out8 - out16).norm() < 0.25 * (out_other - out16).norm()
    assert not torch.equal(out8, out16)
    for key, tokens in fp8.entries.items():  # one float32 scale per token
        assert tokens.hidden.dtype == torch.float8_e4m3fn and tokens.scale.shape == (tokens.hidden.shape[0], 1)
        assert tokens.nbytes == tokens.hidden.numel() + 4 * tokens.hidden.shape[0]
        assert tokens.nbytes <= fp16.entries[key].nbytes * (0.5 + 2 / tokens.hidden.shape[1])


def test_fp8_bank_file_round_trip_and_scale_checks(api, pack, sd15, tmp_path):
    bank_mod, patch = api
    from safetensors import safe_open
    from safetensors.torch import save_file

    bank, _ = record(api, sd15, pack, dtype=torch.float8_e4m3fn)
    path = bank.save(tmp_path / "fp8.safetensors")
    loaded = bank_mod.CharacterBank.load(path)
    assert loaded.entries.keys() == bank.entries.keys() and loaded.size_bytes == bank.size_bytes
    for key, tokens in bank.entries.items():
        assert torch.equal(loaded.entries[key].hidden.view(torch.uint8), tokens.hidden.view(torch.uint8))
        assert torch.equal(loaded.entries[key].scale, tokens.scale)
    run = lambda b: sample(patch.apply_reading(sd15, patch.BankReader((b,))), 2)  # noqa: E731
    assert torch.equal(run(bank), run(loaded))
    with safe_open(str(path), framework="pt") as f:
        meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    for case, damage, fragment in (("no_scale", lambda t: t.pop("0.s"), "missing"),
                                   ("scale_shape", lambda t: t.update({"0.s": t["0.s"][:-1]}), "scales"),
                                   ("scale_dtype", lambda t: t.update({"0.s": t["0.s"].half()}), "scales")):
        bad = dict(tensors)
        damage(bad)
        save_file(bad, str(tmp_path / f"{case}.safetensors"), metadata=meta)
        with pytest.raises(bank_mod.BankFileError, match=fragment):
            bank_mod.CharacterBank.load(tmp_path / f"{case}.safetensors")


def test_version_1_bank_files_are_refused_with_how_to_re_record(api, tmp_path):
    # Format 1 (projected keys and values) cannot be turned back into hidden states: refused, saying what to do.
    bank_mod, _ = api
    from safetensors.torch import save_file

    meta = {"format": "sdn-character-bank", "version": "1", "name": "Mira", "schedule": "[14.6, 2.0, 0.0]",
            "latent_hw": "[8, 8]", "fingerprint": "f" * 32, "reference_count": "1", "settings": "{}",
            "index": '[[0, "output.3.0", 0]]'}
    save_file({"0.k": torch.zeros(4, 32, dtype=torch.float16), "0.v": torch.zeros(4, 32, dtype=torch.float16)},
              str(tmp_path / "old.safetensors"), metadata=meta)
    with pytest.raises(bank_mod.BankFileError, match=r"old\.safetensors: .*version 1.*Re-record the character.*"
                                                     r"SDN_RecordCharacterBank.*SDN_SaveCharacterBank"):
        bank_mod.CharacterBank.load(tmp_path / "old.safetensors")


def test_record_node_limit_and_info_show_the_estimate(pack, sd15):
    # The node's max_size_gb limit applies to UNet banks too: the run is refused when sampling starts, with the
    # estimate, before anything is stored; under the limit, Character Bank's info shows the estimate and the size.
    bank_nodes, errors = pack("nodes.bank_nodes"), pack("errors")
    csa = csa_model(pack, sd15, rate=0.5)
    positive = [[torch.randn(2, 77, 64, generator=torch.Generator().manual_seed(0)), {}]]
    model, rec = bank_nodes.RecordCharacterBank.execute(csa, "fp16", "cpu", max_size_gb=1e-9).result
    with pytest.raises(errors.StoryDiffusionError, match=r"max_size_gb.*estimated .* GB \(\d+ bytes = .*"
                                                         r"bank-free reference mode"):
        sample(model, 2, steps=2, positive=positive)
    assert rec.entries == {} and rec.estimate > 1e-9 * 1e9
    model, rec = bank_nodes.RecordCharacterBank.execute(csa, "fp16", "cpu").result  # default: 8 GB
    assert rec.max_bytes == 8 * 10**9
    samples = sample(model, 2, steps=2, positive=positive)
    bank, info = bank_nodes.CharacterBankNode.execute(rec, {"samples": samples}, "Ann").result
    size = f"{bank.size_bytes / 2**20:.1f} MiB"
    assert rec.estimate == bank.size_bytes and info.count(size) == 2 and "estimated" in info
