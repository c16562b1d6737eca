"""Semantic Motion Predictor: interpolation maths, exactness guarantees, files and errors, loader node, encoders."""
import json
import math
import struct

import numpy as np
import pytest
import torch

import clip_vision_models as cvm

SMALL = dict(width=64, layers=2, heads=4)


@pytest.fixture(scope="module")
def mp(pack):
    return pack("motion")


@pytest.fixture(scope="module")
def ck(pack):
    return pack("motion.checkpoint")


def randomise_(module, seed=0, std=0.2):
    """Trained-like weights: every parameter non-zero (including the zero-initialised output projection)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * std)
    return module


def keyframes(T, C, B=2, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(B, T, C, generator=g).to(dtype) * 3, torch.randn(B, T, C, generator=g).to(dtype) * 3)


def slerp_reference(a, b, t):
    """Independent float64 numpy slerp of directions with linearly interpolated norm (one vector pair)."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    na, nb = np.linalg.norm(a), np.linalg.norm(b)
    ua, ub = a / na, b / nb
    om = math.acos(max(-1.0, min(1.0, float(ua @ ub))))
    d = (math.sin((1 - t) * om) * ua + math.sin(t * om) * ub) / math.sin(om)
    return ((1 - t) * na + t * nb) * d


# ---------------------------------------------------------------- interpolation

def test_lerp_matches_formula_and_midpoint(mp):
    a, b = keyframes(5, 16)
    out = mp.interpolate(a, b, 5, "linear")
    assert out.shape == (2, 5, 5, 16)
    for i in range(5):
        t = i / 4
        torch.testing.assert_close(out[:, i], (1 - t) * a + t * b, rtol=0, atol=1e-6)
    torch.testing.assert_close(out[:, 2], (a + b) / 2, rtol=0, atol=1e-6)
    assert torch.equal(out[:, 0], a) and torch.equal(out[:, -1], b)


def test_slerp_matches_independent_reference(mp):
    a, b = keyframes(3, 8, B=1, seed=1)
    out = mp.interpolate(a, b, 7, "slerp").double()
    for i in range(7):
        for tok in range(3):
            ref = slerp_reference(a[0, tok], b[0, tok], i / 6)
            np.testing.assert_allclose(out[0, i, tok].numpy(), ref, rtol=1e-5, atol=1e-5)


def test_slerp_keeps_norm_for_equal_norm_endpoints_and_lerp_does_not(mp):
    a, b = keyframes(4, 32, seed=2)
    b = b / b.norm(dim=-1, keepdim=True) * a.norm(dim=-1, keepdim=True)  # equal norms per token
    s = mp.interpolate(a, b, 9, "slerp")
    norms = s.norm(dim=-1)
    torch.testing.assert_close(norms, a.norm(dim=-1).unsqueeze(1).expand_as(norms), rtol=1e-5, atol=1e-4)
    lin = mp.interpolate(a, b, 9, "linear")
    assert (lin[:, 4].norm(dim=-1) < 0.95 * a.norm(dim=-1)).all()  # lerp shrinks between distant directions
    # Midpoint direction is the bisector of the two directions.
    ua, ub = a / a.norm(dim=-1, keepdim=True), b / b.norm(dim=-1, keepdim=True)
    bis = (ua + ub) / (ua + ub).norm(dim=-1, keepdim=True)
    torch.testing.assert_close(s[:, 4] / s[:, 4].norm(dim=-1, keepdim=True), bis, rtol=1e-4, atol=1e-5)


def test_slerp_falls_back_to_lerp_for_parallel_antiparallel_and_zero(mp):
    a = torch.tensor([[[1.0, 2.0, 3.0], [1.0, 0.0, 0.0], [0.0, 0.0, 0.0]]])
    b = torch.tensor([[[2.0, 4.0, 6.0], [-3.0, 0.0, 0.0], [1.0, 1.0, 0.0]]])
    s = mp.interpolate(a, b, 5, "slerp")
    lin = mp.interpolate(a, b, 5, "linear")
    assert torch.isfinite(s).all()
    torch.testing.assert_close(s, lin, rtol=0, atol=1e-6)


def test_interpolate_rejects_bad_input(mp):
    a, b = keyframes(4, 8)
    with pytest.raises(ValueError):
        mp.interpolate(a, b[:, :3], 4)
    with pytest.raises(ValueError):
        mp.interpolate(a, b, 1)
    with pytest.raises(ValueError):
        mp.interpolate(a, b, 4, "cubic")


# ---------------------------------------------------------------- predictor

@pytest.mark.parametrize("mode", ["linear", "slerp"])
def test_untrained_predictor_is_exactly_the_interpolation(mp, mode):
    P = mp.SemanticMotionPredictor(mp.make_config(token_count=257, token_dim=1280, **SMALL))
    a, b = keyframes(257, 1280)
    out = P(a, b, 6, interpolation=mode)
    assert out.shape == (2, 6, 257, 1280) and out.dtype == torch.float32
    assert torch.equal(out, mp.interpolate(a, b, 6, mode))


def test_default_architecture_on_pooled_embeds(mp):
    cfg = mp.make_config(token_count=1, token_dim=1024)
    assert (cfg["width"], cfg["layers"], cfg["heads"]) == (1024, 8, 16)
    assert cfg["encoder_output"] == "image_embeds" and cfg["width"] // cfg["heads"] == 64
    P = mp.SemanticMotionPredictor(cfg)
    assert P.config == cfg
    a, b = keyframes(1, 1024, B=3)
    out = P(a, b, 16)
    assert out.shape == (3, 16, 1, 1024)
    assert torch.equal(out, mp.interpolate(a, b, 16))
    with pytest.raises(ValueError):
        mp.make_config(width=1024, heads=12)  # the paper's printed 12 heads do not divide 1024


@pytest.mark.parametrize("mode", ["linear", "slerp"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_endpoints_exact_with_trained_like_weights(mp, mode, dtype):
    P = randomise_(mp.SemanticMotionPredictor(mp.make_config(token_count=257, token_dim=1280, **SMALL)))
    a, b = keyframes(257, 1280, dtype=dtype)
    out = P(a, b, 5, interpolation=mode)
    assert out.dtype == dtype
    assert torch.equal(out[:, 0], a) and torch.equal(out[:, -1], b)
    interp = mp.interpolate(a, b, 5, mode)
    assert (out[:, 1:-1].float() - interp[:, 1:-1].float()).abs().mean() > 1e-2  # the residual is applied


def test_frame_position_reaches_the_transformer(mp):
    # start == end: the interpolation is constant, so only frame-position information can make frames differ.
    P = randomise_(mp.SemanticMotionPredictor(mp.make_config(token_count=1, token_dim=32, **SMALL)), seed=3)
    a, _ = keyframes(1, 32)
    out = P(a, a, 6)
    mids = out[:, 1:-1]
    assert (mids[:, 0] - mids[:, 1]).abs().max() > 1e-3
    assert (mids[:, 1] - mids[:, 2]).abs().max() > 1e-3


def test_predictor_rejects_wrong_token_shape_and_frame_count(mp):
    P = mp.SemanticMotionPredictor(mp.make_config(token_count=1, token_dim=32, max_frames=8, **SMALL))
    a, b = keyframes(1, 32)
    with pytest.raises(ValueError, match="1 tokens of 32"):
        P(*keyframes(257, 32), 4)
    with pytest.raises(ValueError):
        P(a, b, 9)


# ---------------------------------------------------------------- files

@pytest.fixture
def trained(mp):
    return randomise_(mp.SemanticMotionPredictor(mp.make_config(token_count=257, token_dim=1280, **SMALL)), seed=5)


def test_save_load_round_trip(mp, ck, trained, tmp_path):
    path = mp.save_predictor(trained, tmp_path / "p.safetensors", extra_metadata={"step": 12, "note": "x"})
    meta = ck.read_metadata(path)
    assert meta["format"] == ck.FORMAT_NAME and meta["format_version"] == "1"
    assert json.loads(meta["config"]) == trained.config and meta["step"] == "12" and meta["note"] == "x"
    loaded = mp.load_predictor(path)
    assert loaded.config == trained.config and not loaded.training
    a, b = keyframes(257, 1280)
    assert torch.equal(loaded(a, b, 5, "slerp"), trained(a, b, 5, "slerp"))
    half = mp.load_predictor(path, dtype=torch.float16)
    assert next(half.parameters()).dtype == torch.float16


def _write_raw(path, tensors, metadata):
    from safetensors.torch import save_file
    save_file(tensors, str(path), metadata=metadata)
    return path


def test_file_errors_name_the_file_and_the_problem(mp, ck, trained, tmp_path):
    good = mp.save_predictor(trained, tmp_path / "good.safetensors")
    sd = {k: v.contiguous() for k, v in trained.state_dict().items()}
    meta = ck.read_metadata(good)
    Err = ck.MotionPredictorFileError
    errors_mod = type(trained).__module__.rsplit(".", 2)[0] + ".errors"
    import importlib
    assert issubclass(Err, importlib.import_module(errors_mod).StoryDiffusionError)

    cases = {}
    # Weights of another width under this config.
    other = mp.SemanticMotionPredictor(mp.make_config(token_count=257, token_dim=1024, **SMALL))
    cases["shape.safetensors"] = ({k: v.contiguous() for k, v in other.state_dict().items()}, meta, "shape")
    cases["nometa.safetensors"] = (sd, {}, "format")
    cases["noconfig.safetensors"] = (sd, {k: v for k, v in meta.items() if k != "config"}, "config")
    cases["version.safetensors"] = (sd, {**meta, "format_version": "99"}, "format_version")
    cases["badconfig.safetensors"] = (sd, {**meta, "config": json.dumps({"token_count": 3})}, "config")
    missing = dict(sd)
    missing.pop("out_proj.weight")
    cases["missing.safetensors"] = (missing, meta, "missing tensors")
    for name, (tensors, md, word) in cases.items():
        path = _write_raw(tmp_path / name, tensors, md)
        with pytest.raises(Err, match=word) as info:
            mp.load_predictor(path)
        assert name in str(info.value)

    data = good.read_bytes()
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(Err, match="truncated") as info:
        mp.load_predictor(truncated)
    assert "truncated.safetensors" in str(info.value)
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(struct.pack("<Q", 10**12) + b"junk")
    with pytest.raises(Err, match="corrupt"):
        mp.load_predictor(garbage)
    with pytest.raises(Err, match="no such file"):
        mp.load_predictor(tmp_path / "absent.safetensors")


def test_encoder_compat_check(mp, ck):
    P = mp.SemanticMotionPredictor(mp.make_config(token_count=257, token_dim=1280, **SMALL))
    ck.check_encoder_compat(P, "penultimate_hidden_states", 1280, tokens=257)
    with pytest.raises(ck.MotionPredictorCompatError, match="1024 channels"):
        ck.check_encoder_compat(P, "penultimate_hidden_states", 1024)
    with pytest.raises(ck.MotionPredictorCompatError, match="not on image_embeds"):
        ck.check_encoder_compat(P, "image_embeds", 1280)
    with pytest.raises(ck.MotionPredictorCompatError, match="577 tokens"):
        ck.check_encoder_compat(P, "penultimate_hidden_states", 1280, tokens=577)


# ---------------------------------------------------------------- loader node through ComfyUI

def test_loader_node_through_host(host, mp, trained):
    import folder_paths

    folder = host.base_directory / "models" / "motion_predictors"
    assert str(folder) in folder_paths.get_folder_paths("motion_predictors")
    mp.save_predictor(trained, folder / "smp_test.safetensors")
    (folder / "not_a_model.txt").write_text("x")
    assert "smp_test.safetensors" in folder_paths.get_filename_list("motion_predictors")
    assert "not_a_model.txt" not in folder_paths.get_filename_list("motion_predictors")
    prompt = {
        "1": {"class_type": "SDN_MotionPredictorLoader", "inputs": {"predictor_name": "smp_test.safetensors"}},
        "2": {"class_type": "SDN_MotionPredictorInfo", "inputs": {"predictor": ["1", 0]}},
    }
    result = host.run(prompt)
    loaded = result.node_output("1", 0).model  # the payload: a ModelPatcher (test_motion_model_management.py)
    assert isinstance(loaded, mp.SemanticMotionPredictor)
    assert next(loaded.parameters()).device.type == "cpu"
    a, b = keyframes(257, 1280)
    assert torch.equal(loaded(a, b, 4), trained(a, b, 4))
    assert json.loads(result.node_output("2", 0)) == trained.config


def test_loader_node_reports_corrupt_file(host, caplog):
    import re

    from sdn_host import WorkflowError

    folder = host.base_directory / "models" / "motion_predictors"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "broken.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{\"a\":1}")
    prompt = {"1": {"class_type": "SDN_MotionPredictorLoader", "inputs": {"predictor_name": "broken.safetensors"}},
              "2": {"class_type": "SDN_MotionPredictorInfo", "inputs": {"predictor": ["1", 0]}}}
    caplog.clear()
    with pytest.raises(WorkflowError) as info:
        host.run(prompt)
    # ComfyUI forwards execution_error only to a connected client; it always logs the exception.
    text = str(info.value) + "\n" + caplog.text
    assert re.search(r"MotionPredictorFileError.*broken\.safetensors.*corrupt", text), text[-2000:]


# ---------------------------------------------------------------- real CLIP vision architectures

def test_vit_h_helper_is_detected_by_comfy_and_feeds_the_predictor(host, mp, ck, tmp_path_factory):
    import comfy.clip_vision

    path = cvm.shared_clip_vision(tmp_path_factory, "vit_h")
    model = comfy.clip_vision.load(str(path))  # ComfyUI's own detection (the stock CLIPVisionLoader's code)
    assert model is not None
    tokens, width, proj = cvm.SHAPES["vit_h"]
    sd = model.get_sd()
    assert sd["vision_model.embeddings.position_embedding.weight"].shape == (tokens, width)
    assert sd["visual_projection.weight"].shape == (proj, width)
    assert "vision_model.encoder.layers.31.mlp.fc2.weight" in sd and "vision_model.encoder.layers.32.mlp.fc2.weight" not in sd
    w = sd["vision_model.encoder.layers.5.self_attn.q_proj.weight"].float()
    assert torch.isfinite(w).all() and 0.5 / width ** 0.5 < w.std() < 2 / width ** 0.5  # initialised, not garbage

    # A CLIP_VISION_OUTPUT of those shapes (encoding ViT-H on a CPU costs seconds; the transition workflow
    # tests encode through the stock nodes).
    out = comfy.clip_vision.Output()
    out["penultimate_hidden_states"] = torch.randn(2, tokens, width)
    out["image_embeds"] = torch.randn(2, proj)
    plus = mp.SemanticMotionPredictor(mp.make_config(token_count=257, token_dim=1280, **SMALL))
    tok = ck.tokens_from_clip_vision_output(out, plus)
    assert torch.equal(tok, out["penultimate_hidden_states"])
    assert plus(tok, tok.flip(0), 4).shape == (2, 4, 257, 1280)
    pooled = mp.SemanticMotionPredictor(mp.make_config(token_count=1, token_dim=1024, **SMALL))
    assert torch.equal(ck.tokens_from_clip_vision_output(out, pooled)[:, 0], out["image_embeds"])
    small = mp.SemanticMotionPredictor(mp.make_config(token_count=50, token_dim=64, **SMALL))
    with pytest.raises(ck.MotionPredictorCompatError, match="1280 channels"):
        ck.tokens_from_clip_vision_output(out, small)


def test_small_clip_vision_helper(host, tmp_path):
    path = cvm.write_clip_vision(tmp_path / "small.safetensors", "small", seed=1)
    model = cvm.load_clip_vision(path)
    out = model.encode_image(torch.rand(2, 64, 96, 3, generator=torch.Generator().manual_seed(0)))
    tokens, width, proj = cvm.SHAPES["small"]
    assert tuple(out["penultimate_hidden_states"].shape) == (2, tokens, width)
    assert tuple(out["image_embeds"].shape) == (2, proj)
    # Non-degenerate: different images and different token positions give different features.
    h = out["penultimate_hidden_states"]
    assert (h[0] - h[1]).abs().mean() > 1e-2 and (h[0, 1] - h[0, 2]).abs().mean() > 1e-2
    # Deterministic per seed.
    again = cvm.random_state_dict(cvm.model_config("small"), seed=1)
    import comfy.utils
    stored = comfy.utils.load_torch_file(str(path))
    assert all(torch.equal(again[k], stored[k]) for k in again)
