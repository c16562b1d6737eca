"""SDN_TransitionEmbeds logic through ComfyUI's clip_vision (CLIPVisionModelProjection, the ViT-H class with a
small config: cheap encodes on a CPU; the real ViT-H/14 shapes (257 x 1280, 1024) are checked through the stock
CLIPVisionLoader in test_transition_workflows.py).

Expectations come from ComfyUI's own ``clip_vision.encode_image`` of the keyframes (and of a black image),
and from ``motion.predictor.interpolate``: endpoints and boundaries between transitions must reproduce the
keyframe encodings, frames in between the interpolation (or the predictor's output when one is given).
"""
import numpy as np
import pytest
import torch

from clip_vision_models import SHAPES, load_clip_vision, write_clip_vision

TOKENS, WIDTH, PROJ = SHAPES["small"]
L = 3  # frames per transition


def keyframe_images(n, size=64):
    """Real photos from scikit-image, resized: (n, size, size, 3) float in [0, 1]."""
    import skimage.data
    from PIL import Image

    out = []
    for name in ("astronaut", "chelsea", "coffee", "rocket")[:n]:
        im = Image.fromarray(getattr(skimage.data, name)()).convert("RGB").resize((size, size))
        out.append(torch.from_numpy(np.asarray(im).astype(np.float32) / 255.0))
    return torch.stack(out)


@pytest.fixture(scope="module")
def small_cv(host, tmp_path_factory):
    return load_clip_vision(write_clip_vision(tmp_path_factory.mktemp("cv") / "small.safetensors", "small"))


@pytest.fixture(scope="module")
def te(pack):
    return pack("motion.transition_embeds")


@pytest.fixture(scope="module")
def errors(pack):
    return pack("errors")


@pytest.fixture(scope="module")
def images():
    return keyframe_images(3)


@pytest.fixture(scope="module")
def reference(small_cv, images):
    """ComfyUI's encoding of the 3 keyframes and a black image, one batch."""
    black = torch.zeros_like(images[:1])
    return small_cv.encode_image(torch.cat([images, black]), crop=True)


@pytest.fixture(scope="module")
def plus_result(te, small_cv, images):
    return te.transition_embeds(small_cv, images, L, "linear", "penultimate_hidden_states")


def test_penultimate_embeds_shapes_endpoints_and_boundaries(plus_result, reference, pack):
    embeds, negative, out, frames = plus_result
    assert frames == 2 * (L - 1) + 1
    assert embeds.shape == (frames, TOKENS, WIDTH) and negative.shape == embeds.shape
    ref = reference["penultimate_hidden_states"].float()
    for k in range(3):  # keyframe k at frame k*(L-1): first, boundary, last
        torch.testing.assert_close(embeds[k * (L - 1)], ref[k], rtol=1e-3, atol=1e-3)
    interp = pack("motion.predictor").interpolate(ref[:2], ref[1:3], L, "linear")
    torch.testing.assert_close(embeds[1], interp[0, 1], rtol=1e-3, atol=1e-3)
    torch.testing.assert_close(embeds[L], interp[1, 1], rtol=1e-3, atol=1e-3)
    # negative: the black image's encoding on every frame
    torch.testing.assert_close(negative, ref[3:4].expand(frames, -1, -1), rtol=1e-3, atol=1e-3)
    # the CLIP_VISION_OUTPUT: the chosen kind is embeds, the other fields per frame through the keyframes
    assert torch.equal(out["penultimate_hidden_states"], embeds)
    assert out["image_embeds"].shape == (frames, PROJ)
    assert out["last_hidden_state"].shape == (frames, TOKENS, WIDTH)
    torch.testing.assert_close(out["image_embeds"][L - 1], reference["image_embeds"][1].float(), rtol=1e-3, atol=1e-3)


def test_image_embeds_kind_and_untrained_predictor(te, small_cv, images, reference, pack):
    pred_mod = pack("motion.predictor")
    predictor = pred_mod.SemanticMotionPredictor(pred_mod.make_config(
        token_count=1, token_dim=PROJ, width=64, layers=1, heads=4))
    embeds, negative, out, frames = te.transition_embeds(small_cv, images[:2], 4, "slerp", "image_embeds",
                                                         pack("motion.managed").module_patcher(predictor))
    assert embeds.shape == (4, PROJ) and frames == 4
    assert torch.equal(negative, torch.zeros_like(embeds))
    ref = reference["image_embeds"][:2].float()
    # untrained predictor (zero output projection) == the interpolation
    expected = pred_mod.interpolate(ref[:1, None], ref[1:2, None], 4, "slerp")[0, :, 0]
    torch.testing.assert_close(embeds, expected, rtol=1e-3, atol=1e-3)
    assert torch.equal(out["image_embeds"], embeds)


def test_trained_predictor_changes_inner_frames_only(te, small_cv, pack):
    pred_mod = pack("motion.predictor")
    predictor = pred_mod.SemanticMotionPredictor(pred_mod.make_config(
        token_count=TOKENS, token_dim=WIDTH, width=32, layers=1, heads=4))
    torch.nn.init.normal_(predictor.out_proj.weight, std=0.5)  # stand-in for training
    imgs = keyframe_images(2)
    plain, _, _, _ = te.transition_embeds(small_cv, imgs, 5, "linear", "penultimate_hidden_states")
    pred, _, _, _ = te.transition_embeds(small_cv, imgs, 5, "linear", "penultimate_hidden_states",
                                         pack("motion.managed").module_patcher(predictor))
    assert torch.equal(pred[0], plain[0]) and torch.equal(pred[-1], plain[-1])
    assert (pred[1:-1] - plain[1:-1]).abs().amax() > 1e-3
    assert next(predictor.parameters()).device.type == "cpu"  # its patcher's load device: the CPU on this host


def test_mismatching_predictor_refused(te, small_cv, errors, pack):
    pred_mod = pack("motion.predictor")
    imgs = keyframe_images(2)
    wrong_kind = pred_mod.SemanticMotionPredictor(pred_mod.make_config(token_count=1, token_dim=PROJ, width=32,
                                                                       layers=1, heads=4))
    managed = pack("motion.managed").module_patcher
    with pytest.raises(errors.NodeInputError, match="predictor"):
        te.transition_embeds(small_cv, imgs, 4, "linear", "penultimate_hidden_states", managed(wrong_kind))
    wrong_dim = pred_mod.SemanticMotionPredictor(pred_mod.make_config(token_count=TOKENS, token_dim=WIDTH * 2, width=32,
                                                                      layers=1, heads=4))
    with pytest.raises(errors.NodeInputError, match="predictor"):
        te.transition_embeds(small_cv, imgs, 4, "linear", "penultimate_hidden_states", managed(wrong_dim))
    with pytest.raises(errors.NodeInputError, match="SDN_MOTION_PREDICTOR"):  # a bare module, not the payload
        te.transition_embeds(small_cv, imgs, 4, "linear", "penultimate_hidden_states", wrong_dim)
    with pytest.raises(errors.NodeInputError, match="at least 2 keyframes"):
        te.transition_embeds(small_cv, imgs[:1], 4, "linear", "penultimate_hidden_states")


def test_embeds_slice_under_ad_context_window(te, small_cv, pack):
    """A window of AnimateDiff-Evolved (ad_params.sub_idxs) reads exactly those frames' image tokens."""
    ipmod = pack("motion.ip_adapter")
    embeds, neg, _, frames = te.transition_embeds(small_cv, keyframe_images(3), 3,
                                                  "linear", "penultimate_hidden_states")
    pos = torch.arange(frames, dtype=torch.float32)[:, None, None].expand(frames, 2, 4)
    weights = ipmod.IPAdapterWeights(torch.nn.Identity(), [4], 4)
    torch.nn.init.eye_(weights.to_k_ip[0].weight)
    torch.nn.init.eye_(weights.to_v_ip[0].weight)
    patch = ipmod.IPAdapterAttn2(pack("motion.managed").module_patcher(weights), 0, pos, -pos, 1.0)
    seen = {}

    def fake_attention(q, k, v, heads, attn_precision=None):
        seen.setdefault("kv", []).append(k)
        return torch.zeros_like(q)

    import comfy.ldm.modules.attention as attn
    orig = attn.optimized_attention
    attn.optimized_attention = fake_attention
    try:
        q = torch.zeros(4, 3, 4)
        options = {"n_heads": 1, "cond_or_uncond": [1, 0],
                   "ad_params": {"full_length": frames, "context_length": 2, "sub_idxs": [3, 4]}}
        # the model call's context, as the patched model's APPLY_MODEL wrapper makes it
        call = ipmod.describe_call(options, q.shape[0], {frames}, None, q.device)
        patch(q, q, q, {**options, ipmod.CONTEXT: call})
    finally:
        attn.optimized_attention = orig
    ik = seen["kv"][1]  # second call: the image tokens
    assert ik[:, 0, 0].tolist() == [-3.0, -4.0, 3.0, 4.0]  # rows = chunk * B + frame; uncond first
    assert embeds.shape[0] == frames == 5
