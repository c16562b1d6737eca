"""Hostile and corrupt files: every loader node (character banks, IP-Adapters, motion predictors) refuses them
with the pack's NodeInputError naming the node, the input and the file, and a file's header cannot make the
pack allocate more than the file holds."""
import json
import re
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent


def split_file(data: bytes) -> tuple[dict, bytes]:
    """A safetensors file's header (JSON) and its data section."""
    n = struct.unpack("<Q", data[:8])[0]
    return json.loads(data[8:8 + n]), data[8 + n:]


def join_file(header: dict, body: bytes) -> bytes:
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + body


def refused(host, node, input_name, file_name, *fragments) -> str:
    """Run ``node`` on ``file_name`` through ComfyUI's executor; return its error message after checking that it
    is the pack's NodeInputError naming the node, the input and the file."""
    import sdn_host

    prompt = {"1": {"class_type": node, "inputs": {input_name: file_name}},
              "2": {"class_type": "PreviewAny", "inputs": {"source": ["1", 0]}}}
    with pytest.raises(sdn_host.WorkflowError) as info:
        host.run(prompt)
    msg = str(info.value)
    assert re.search(rf"raised \S*\.errors\.NodeInputError: {node}: input '{input_name}'", msg), msg
    assert file_name in msg, msg
    for fragment in fragments:
        assert fragment.lower() in msg.lower(), msg
    return msg


def model_folder(pack, module, register, name) -> Path:
    import folder_paths

    getattr(pack(module), register)()
    folder = Path(folder_paths.get_folder_paths(name)[0])
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def truncated(data: bytes) -> bytes:
    return data[: len(data) // 2]


GARBAGE = bytes(range(256)) * 8
HEADER_NOT_JSON = struct.pack("<Q", 16) + b"{this is no json"


def tampered_header(data: bytes, change) -> bytes:
    header, body = split_file(data)
    change(header)
    return join_file(header, body)


def first_tensor(header: dict) -> str:
    return next(k for k in header if k != "__metadata__")


RAW_CASES = {  # damage any safetensors file: (transform of the file bytes, fragment of the message)
    "truncated": (truncated, "unreadable"),
    "garbage": (lambda data: GARBAGE, "unreadable"),
    "header_not_json": (lambda data: HEADER_NOT_JSON + data[24:], "unreadable"),
    "header_length_huge": (lambda data: struct.pack("<Q", 2 ** 62) + data[8:], "unreadable"),
    "offsets_beyond_file": (lambda data: tampered_header(
        data, lambda h: h[first_tensor(h)].update(data_offsets=[0, 10 ** 12])), "unreadable"),
    "shape_claims_more": (lambda data: tampered_header(
        data, lambda h: h[first_tensor(h)].update(shape=[10 ** 6, 10 ** 6])), "unreadable"),
}


# ---------------------------------------------------------------- character banks

@pytest.fixture(scope="module")
def bank_mod(pack):
    return pack("attention.bank")


@pytest.fixture(scope="module")
def bank_folder(host, pack):
    return model_folder(pack, "nodes.bank_nodes", "_register_folder", "sdn_characters")


LAYERS = {"output.3.0": (8, 32), "output.6.0": (32, 16)}  # layer -> (tokens per reference, channels)


def bank_entries(dtype=torch.float16, refs=2, steps=2):
    g = torch.Generator().manual_seed(0)
    entries = {}
    for step in range(steps):
        for layer, (m, c) in LAYERS.items():
            for half in (0, 1):
                entries[(step, layer, half)] = (torch.randn(refs * m, c, generator=g).to(dtype), None)
    return entries


@pytest.fixture(scope="module")
def good_bank(bank_mod, tmp_path_factory):
    """(bytes, metadata, tensors) of a valid bank file: 2 references, 2 steps, 2 layers, both CFG halves."""
    from safetensors import safe_open

    bank = bank_mod.CharacterBank("Mira", "a girl", bank_entries(), (14.6, 2.0, 0.0), (8, 8), "f" * 32, 2,
                                  {"rate": 0.5})
    path = bank.save(tmp_path_factory.mktemp("banks") / "good.safetensors")
    with safe_open(str(path), framework="pt") as f:
        meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    return path.read_bytes(), meta, tensors


def entry_of(meta, key):
    return [list(e) for e in json.loads(meta["index"])].index(list(key))


def index_with(meta, i, item):
    index = json.loads(meta["index"])
    index[i] = item
    return json.dumps(index)


BANK_META_CASES = {  # metadata value -> (new value, or None to drop the key; fragment of the message)
    "index_not_a_list": ("index", lambda m: "5", "index"),
    "index_entry_nulls": ("index", lambda m: index_with(m, 0, [None, "output.3.0", 0]), "index"),
    "index_entry_short": ("index", lambda m: index_with(m, 0, [0, "output.3.0"]), "index"),
    "index_layer_unparsable": ("index", lambda m: index_with(m, 0, [0, "up.three", 0]), "index"),
    "index_half_out_of_range": ("index", lambda m: index_with(m, 0, [0, "output.3.0", 7]), "index"),
    "index_step_beyond_schedule": ("index", lambda m: index_with(m, 0, [9, "output.3.0", 0]), "step"),
    "index_duplicate_entry": ("index", lambda m: index_with(m, 1, json.loads(m["index"])[0]), "twice"),
    "schedule_not_json": ("schedule", lambda m: "[14.6, 2.0", "schedule"),
    "schedule_a_string": ("schedule", lambda m: '"14.6 2.0 0.0"', "schedule"),
    "schedule_not_numbers": ("schedule", lambda m: '[14.6, "two", 0.0]', "schedule"),
    "schedule_nested": ("schedule", lambda m: "[[14.6], [2.0], [0.0]]", "schedule"),
    "latent_hw_one_number": ("latent_hw", lambda m: "[8]", "latent_hw"),
    "latent_hw_words": ("latent_hw", lambda m: '["eight", "eight"]', "latent_hw"),
    "reference_count_word": ("reference_count", lambda m: "two", "reference_count"),
    "reference_count_zero": ("reference_count", lambda m: "0", "reference_count"),
    "settings_not_json": ("settings", lambda m: "rate=0.5", "settings"),
    "settings_a_list": ("settings", lambda m: "[0.5]", "settings"),
    "no_fingerprint": ("fingerprint", lambda m: None, "fingerprint"),
    "no_name": ("name", lambda m: None, "name"),
    "empty_name": ("name", lambda m: "", "name"),
    "no_index": ("index", lambda m: None, "index"),
    "kind_unknown": ("kind", lambda m: "vae", "kind"),
    "kind_dit_with_unet_layers": ("kind", lambda m: "dit", "dit bank"),
    "unet_bank_naming_dit_blocks": ("index", lambda m: index_with(m, 0, [0, "double.0", 0]), "unet bank"),
}


def _bank_tensor_case(meta, tensors, case):
    t = dict(tensors)
    i = entry_of(meta, (0, "output.3.0", 0))
    h = f"{i}.h"
    if case == "scales_without_fp8":
        t[f"{i}.s"] = torch.ones(t[h].shape[0], 1)
    elif case == "rows_not_a_multiple_of_references":
        t[h] = t[h][:-1]
    elif case == "integer_tensors":
        t[h] = t[h].to(torch.int16)
    elif case == "three_dimensional":
        t[h] = t[h].reshape(2, 8, 32)
    elif case == "mixed_dtypes":
        t[h] = t[h].float()
    elif case == "layer_changes_shape":
        j = entry_of(meta, (1, "output.3.0", 0))
        t[f"{j}.h"] = t[f"{j}.h"][:, :16].contiguous()
    elif case == "missing_tensor":
        del t[h]
    elif case == "extra_tensor":
        t["x.k"] = torch.zeros(1)
    return t


BANK_TENSOR_CASES = {"scales_without_fp8": "unexpected", "rows_not_a_multiple_of_references": "reference",
                     "integer_tensors": "dtype", "three_dimensional": "shape", "mixed_dtypes": "dtype",
                     "layer_changes_shape": "shape", "missing_tensor": "missing", "extra_tensor": "unexpected"}


def test_dit_bank_rows_must_be_keys_and_values_of_every_reference(host, bank_folder, bank_mod):
    # A DiT bank entry is (2 * R * M, C): keys then values. 2 references x 4 tokens: 16 rows; 14 rows are refused.
    from safetensors import safe_open
    from safetensors.torch import save_file

    entries = {(0, "double.0", 0): (torch.randn(16, 8), None), (0, "single.0", 0): (torch.randn(16, 8), None)}
    bank = bank_mod.CharacterBank("Kai", "", entries, (1.0, 0.0), (6, 6), "f" * 32, 2, {})
    path = bank.save(bank_folder / "dit_kai.safetensors")
    assert bank_mod.CharacterBank.load(path).kind == "dit"
    with safe_open(str(path), framework="pt") as f:
        meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    assert meta["kind"] == "dit"
    tensors["0.h"] = tensors["0.h"][:14].contiguous()
    save_file(tensors, str(bank_folder / "dit_odd.safetensors"), metadata=meta)
    refused(host, "SDN_LoadCharacterBank", "bank_name", "dit_odd.safetensors", "keys and values")


@pytest.mark.parametrize("case", sorted(RAW_CASES))
def test_corrupt_bank_files_are_refused_by_the_load_node(host, bank_folder, good_bank, case):
    damage, fragment = RAW_CASES[case]
    name = f"raw_{case}.safetensors"
    (bank_folder / name).write_bytes(damage(good_bank[0]))
    refused(host, "SDN_LoadCharacterBank", "bank_name", name, fragment)


@pytest.mark.parametrize("case", sorted(BANK_META_CASES))
def test_tampered_bank_metadata_is_refused_by_the_load_node(host, bank_folder, good_bank, case):
    from safetensors.torch import save_file

    _, meta, tensors = good_bank
    key, value, fragment = BANK_META_CASES[case]
    meta = dict(meta)
    new = value(meta)
    if new is None:
        del meta[key]
    else:
        meta[key] = new
    name = f"meta_{case}.safetensors"
    save_file(tensors, str(bank_folder / name), metadata=meta)
    refused(host, "SDN_LoadCharacterBank", "bank_name", name, fragment)


@pytest.mark.parametrize("case", sorted(BANK_TENSOR_CASES))
def test_bank_tensors_must_match_their_metadata(host, bank_folder, good_bank, case):
    from safetensors.torch import save_file

    _, meta, tensors = good_bank
    name = f"tensors_{case}.safetensors"
    save_file(_bank_tensor_case(meta, tensors, case), str(bank_folder / name), metadata=meta)
    refused(host, "SDN_LoadCharacterBank", "bank_name", name, BANK_TENSOR_CASES[case])


def masked_entries():
    """bank_entries() with region bits (recorded with subject masks): one bool a row."""
    g = torch.Generator().manual_seed(1)
    return {key: (h, s, torch.rand(h.shape[0], generator=g) > 0.5) for key, (h, s) in bank_entries().items()}


@pytest.fixture(scope="module")
def masked_bank(bank_mod, tmp_path_factory):
    """(metadata, tensors) of a valid bank file recorded with subject masks (tensors ``<i>.b``)."""
    from safetensors import safe_open

    bank = bank_mod.CharacterBank("Mira", "", masked_entries(), (14.6, 2.0, 0.0), (8, 8), "f" * 32, 2, {})
    path = bank.save(tmp_path_factory.mktemp("banks") / "masked.safetensors")
    with safe_open(str(path), framework="pt") as f:
        return f.metadata(), {k: f.get_tensor(k) for k in f.keys()}


BITS_CASES = {  # damage to the region bits: (tensors -> tensors, fragment of the message)
    "bits_missing_on_one_entry": (lambda t: t.pop("1.b"), "missing"),
    "bits_as_bytes": (lambda t: t.update({"0.b": t["0.b"].to(torch.uint8)}), "region bits"),
    "bits_one_short": (lambda t: t.update({"0.b": t["0.b"][:-1].contiguous()}), "region bits"),
    "bits_two_dimensional": (lambda t: t.update({"0.b": t["0.b"][:, None].contiguous()}), "region bits"),
    "bits_claiming_more": (lambda t: t.update({"0.b": torch.ones(10 ** 5, dtype=torch.bool)}), "region bits"),
}


@pytest.mark.parametrize("case", sorted(BITS_CASES))
def test_bank_region_bits_must_match_their_entries(host, bank_folder, masked_bank, case):
    from safetensors.torch import save_file

    meta, tensors = masked_bank
    damage, fragment = BITS_CASES[case]
    tensors = dict(tensors)
    damage(tensors)
    name = f"bits_{case}.safetensors"
    save_file(tensors, str(bank_folder / name), metadata=meta)
    refused(host, "SDN_LoadCharacterBank", "bank_name", name, fragment)


def test_bits_on_a_bank_without_them_are_refused(host, bank_folder, good_bank):
    from safetensors.torch import save_file

    _, meta, tensors = good_bank
    save_file({**tensors, "0.b": torch.ones(tensors["0.h"].shape[0], dtype=torch.bool)},
              str(bank_folder / "bits_on_one.safetensors"), metadata=meta)
    refused(host, "SDN_LoadCharacterBank", "bank_name", "bits_on_one.safetensors", "missing")


def test_masked_bank_loads_through_the_node(host, bank_folder, masked_bank):
    from safetensors.torch import save_file

    meta, tensors = masked_bank
    save_file(tensors, str(bank_folder / "masked_mira.safetensors"), metadata=meta)
    run = host.run({"1": {"class_type": "SDN_LoadCharacterBank", "inputs": {"bank_name": "masked_mira.safetensors"}},
                    "2": {"class_type": "PreviewAny", "inputs": {"source": ["1", 1]}}})
    bank = run.node_output("1", 0)
    entries = masked_entries()
    assert bank.masked and bank.entries.keys() == entries.keys()
    assert all(torch.equal(bank.entries[k].bits, entries[k][2]) for k in entries)


def test_good_bank_loads_through_the_node(host, bank_folder, good_bank, bank_mod):
    (bank_folder / "good_mira.safetensors").write_bytes(good_bank[0])
    run = host.run({"1": {"class_type": "SDN_LoadCharacterBank", "inputs": {"bank_name": "good_mira.safetensors"}},
                    "2": {"class_type": "PreviewAny", "inputs": {"source": ["1", 1]}}})
    bank = run.node_output("1", 0)
    entries = bank_entries()
    assert bank.name == "Mira" and bank.reference_count == 2 and bank.latent_hw == (8, 8)
    assert bank.entries.keys() == entries.keys()
    assert all(torch.equal(bank.entries[k][0], entries[k][0]) for k in entries)


def test_bank_save_never_replaces_a_file(bank_mod, tmp_path):
    bank = bank_mod.CharacterBank("Mira", "", bank_entries(), (14.6, 2.0, 0.0), (8, 8), "f" * 32, 2, {})
    path = tmp_path / "Mira.safetensors"
    path.write_bytes(b"a user's file")
    with pytest.raises(FileExistsError, match="Mira.safetensors"):
        bank.save(path)
    assert path.read_bytes() == b"a user's file"


# ---------------------------------------------------------------- IP-Adapters

def ip_state_dict(kind, depth=1, cross=64, inner=(64, 128), seed=0):
    """Real IP-Adapter key layout (plain or plus), small widths, flat safetensors keys."""
    g = torch.Generator().manual_seed(seed)

    def r(*shape):
        return torch.randn(*shape, generator=g) * 0.05

    if kind == "plain":
        proj = {"proj.weight": r(4 * cross, 32), "proj.bias": r(4 * cross), "norm.weight": 1 + r(cross),
                "norm.bias": r(cross)}
    else:
        proj = {"latents": r(1, 4, cross), "proj_in.weight": r(cross, 48), "proj_in.bias": r(cross),
                "proj_out.weight": r(cross, cross), "proj_out.bias": r(cross), "norm_out.weight": 1 + r(cross),
                "norm_out.bias": r(cross)}
        for i in range(depth):
            p = f"layers.{i}."
            proj.update({p + "0.norm1.weight": 1 + r(cross), p + "0.norm1.bias": r(cross),
                         p + "0.norm2.weight": 1 + r(cross), p + "0.norm2.bias": r(cross),
                         p + "0.to_q.weight": r(cross, cross), p + "0.to_kv.weight": r(2 * cross, cross),
                         p + "0.to_out.weight": r(cross, cross), p + "1.0.weight": 1 + r(cross),
                         p + "1.0.bias": r(cross), p + "1.1.weight": r(4 * cross, cross),
                         p + "1.3.weight": r(cross, 4 * cross)})
    sd = {"image_proj." + k: v for k, v in proj.items()}
    for i, n in enumerate(inner):
        sd[f"ip_adapter.{2 * i + 1}.to_k_ip.weight"] = r(n, cross)
        sd[f"ip_adapter.{2 * i + 1}.to_v_ip.weight"] = r(n, cross)
    return sd


@pytest.fixture(scope="module")
def ip_folder(host, pack):
    return model_folder(pack, "nodes.transition_nodes", "ipadapter_files", "ipadapter")


def _ip_case(case):
    sd = ip_state_dict("plain" if case.startswith("plain") else "plus")
    if case == "plus_missing_layer_key":
        del sd["image_proj.layers.0.0.to_q.weight"]
    elif case == "plus_latents_2d":
        sd["image_proj.latents"] = sd["image_proj.latents"][0]
    elif case == "plus_out_width_differs":
        sd["image_proj.norm_out.weight"] = torch.ones(32)
    elif case == "plain_ip_weight_1d":
        sd["ip_adapter.1.to_k_ip.weight"], sd["ip_adapter.1.to_v_ip.weight"] = torch.zeros(64), torch.zeros(64)
    elif case == "plain_integer_weights":
        sd["image_proj.proj.weight"] = sd["image_proj.proj.weight"].to(torch.int32)
    elif case == "plus_layers_claimed_by_key_names":
        for i in range(1, 40):  # one tiny tensor per claimed layer: the module would be 40 full layers
            sd[f"image_proj.layers.{i}.0.norm1.weight"] = torch.ones(64)
    return sd


IP_CASES = {"plus_missing_layer_key": "missing", "plus_latents_2d": "latents", "plus_out_width_differs": "shape",
            "plain_ip_weight_1d": "to_k_ip", "plain_integer_weights": "float",
            "plus_layers_claimed_by_key_names": "missing"}


@pytest.mark.parametrize("case", sorted(RAW_CASES))
def test_corrupt_ipadapter_safetensors_are_refused(host, ip_folder, case, tmp_path):
    from safetensors.torch import save_file

    damage, _ = RAW_CASES[case]
    good = tmp_path / "good.safetensors"
    save_file(ip_state_dict("plus"), str(good))
    name = f"raw_{case}.safetensors"
    (ip_folder / name).write_bytes(damage(good.read_bytes()))
    refused(host, "SDN_IPAdapterLoader", "ipadapter_name", name, "readable")


@pytest.mark.parametrize("case", ["garbage", "truncated", "a_list", "strings", "tensor"])
def test_corrupt_ipadapter_bin_files_are_refused(host, ip_folder, case, tmp_path):
    name = f"bin_{case}.bin"
    path = ip_folder / name
    nested = {"image_proj": {k[len("image_proj."):]: v for k, v in ip_state_dict("plain").items()
                             if k.startswith("image_proj.")},
              "ip_adapter": {k[len("ip_adapter."):]: v for k, v in ip_state_dict("plain").items()
                             if k.startswith("ip_adapter.")}}
    if case == "garbage":
        path.write_bytes(GARBAGE)
    elif case == "truncated":
        torch.save(nested, tmp_path / "good.bin")
        path.write_bytes(truncated((tmp_path / "good.bin").read_bytes()))
    elif case == "a_list":
        torch.save([1, 2, 3], path)
    elif case == "strings":
        torch.save({"image_proj": {k: "x" for k in nested["image_proj"]}, "ip_adapter": nested["ip_adapter"]}, path)
    elif case == "tensor":
        torch.save(torch.zeros(3), path)
    refused(host, "SDN_IPAdapterLoader", "ipadapter_name", name)


@pytest.mark.parametrize("case", sorted(IP_CASES))
def test_inconsistent_ipadapter_weights_are_refused(host, ip_folder, case):
    from safetensors.torch import save_file

    name = f"weights_{case}.safetensors"
    save_file(_ip_case(case), str(ip_folder / name))
    refused(host, "SDN_IPAdapterLoader", "ipadapter_name", name, IP_CASES[case])


# ---------------------------------------------------------------- motion predictors

SMALL = dict(token_count=257, token_dim=1280, width=64, layers=2, heads=4)


@pytest.fixture(scope="module")
def predictor_folder(host, pack):
    return model_folder(pack, "nodes.motion_nodes", "register_model_folder", "motion_predictors")


@pytest.fixture(scope="module")
def good_predictor(pack, tmp_path_factory):
    mp = pack("motion")
    path = mp.save_predictor(mp.SemanticMotionPredictor(mp.make_config(**SMALL)),
                             tmp_path_factory.mktemp("predictors") / "good.safetensors")
    return path.read_bytes()


def claiming(data: bytes, **config) -> bytes:
    """The same weights, with a header whose config claims another architecture."""
    def change(header):
        header["__metadata__"]["config"] = json.dumps({**json.loads(header["__metadata__"]["config"]), **config})
    return tampered_header(data, change)


@pytest.mark.parametrize("case", sorted(RAW_CASES))
def test_corrupt_predictor_files_are_refused_by_the_loader_node(host, predictor_folder, good_predictor, case):
    damage, _ = RAW_CASES[case]
    name = f"raw_{case}.safetensors"
    (predictor_folder / name).write_bytes(damage(good_predictor))
    refused(host, "SDN_MotionPredictorLoader", "predictor_name", name, "predictor")


@pytest.mark.parametrize("claim,fragment", [
    ({"width": 10 ** 8}, "shape"),          # ~0.5 TB of weights if built for real
    ({"token_dim": 10 ** 11}, "shape"),
    ({"mlp_ratio": 1e9}, "shape"),
    ({"layers": 2000}, "layers"),            # counted from the tensor names before anything is built
])
def test_predictor_header_claiming_a_huge_model_is_refused(host, predictor_folder, good_predictor, claim, fragment):
    name = "claims_" + "_".join(f"{k}{v}" for k, v in claim.items()) + ".safetensors"
    (predictor_folder / name).write_bytes(claiming(good_predictor, **claim))
    msg = refused(host, "SDN_MotionPredictorLoader", "predictor_name", name, fragment)
    if "layers" in claim:
        assert "2000" in msg, msg


PEAK = r"""
import importlib, importlib.util, json, resource, sys
root, module, call, path = sys.argv[1:]
spec = importlib.util.spec_from_file_location("sdnpack", root + "/__init__.py", submodule_search_locations=[root])
pkg = importlib.util.module_from_spec(spec)
sys.modules["sdnpack"] = pkg
spec.loader.exec_module(pkg)
mod = importlib.import_module("sdnpack." + module)
from safetensors.torch import load_file
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
try:
    eval(call)
    error = None
except Exception as e:
    error = type(e).__name__
print(json.dumps({"peak_mb": (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024, "error": error}))
"""


def peak_of(module, call, path) -> dict:
    """Run ``call`` (Python, with ``mod`` = the pack module, ``path``) in a fresh process; its peak memory growth."""
    proc = subprocess.run([sys.executable, "-c", PEAK, str(REPO), module, call, str(path)], capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_predictor_claim_costs_no_memory(good_predictor, tmp_path):
    # 100 KB-scale file, header claiming width 4096: ~1.6 GB of weights if the module were built for real.
    path = tmp_path / "claims_width.safetensors"
    path.write_bytes(claiming(good_predictor, width=4096))
    result = peak_of("motion.checkpoint", "mod.load_predictor(path)", path)
    assert result["error"] == "MotionPredictorFileError", result
    assert result["peak_mb"] < 200, result


def test_ipadapter_layer_claim_costs_no_memory(tmp_path):
    # A 13 MB file with one tiny tensor per claimed resampler layer: 80 full layers (~1 GB) if built for real.
    from safetensors.torch import save_file

    sd = ip_state_dict("plus", cross=512, inner=(64,))
    for i in range(1, 80):
        sd[f"image_proj.layers.{i}.0.norm1.weight"] = torch.ones(512)
    path = tmp_path / "claims_layers.safetensors"
    save_file(sd, str(path))
    result = peak_of("motion.ip_adapter", "mod.parse_state_dict(load_file(path), 'claims_layers.safetensors')", path)
    assert result["error"] == "NodeInputError", result
    assert result["peak_mb"] < 200, result
