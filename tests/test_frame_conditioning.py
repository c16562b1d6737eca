"""Per-frame text conditionings (SDN_ConditioningTransition): joining, endpoints, token lengths, pooled output."""
import pytest
import torch


@pytest.fixture(scope="module")
def fc(pack):
    return pack("motion.frame_conditioning")


@pytest.fixture(scope="module")
def errors(pack):
    return pack("errors")


def cond(*tensors, pooled=None):
    extras = {} if pooled is None else {"pooled_output": pooled}
    return [[torch.cat(tensors, 0), extras]]


def test_story_keyframes_join_with_shared_boundaries(fc):
    g = torch.Generator().manual_seed(0)
    keys = torch.randn(3, 77, 32, generator=g)
    L = 5
    (out, extras), = fc.conditioning_transition([cond(keys), None], L, "linear")[0]
    assert out.shape == (2 * (L - 1) + 1, 77, 32)
    for k in range(3):  # keyframe k sits at frame k * (L - 1), exactly
        assert torch.equal(out[k * (L - 1)], keys[k])
    for i in range(L):  # independent lerp expectation, both transitions
        t = i / (L - 1)
        torch.testing.assert_close(out[i], (1 - t) * keys[0] + t * keys[1])
        torch.testing.assert_close(out[L - 1 + i], (1 - t) * keys[1] + t * keys[2])
    assert "pooled_output" not in extras


def test_slerp_keeps_direction_on_the_great_circle(fc):
    a = torch.zeros(1, 1, 2)
    b = torch.zeros(1, 1, 2)
    a[..., 0], b[..., 1] = 2.0, 4.0  # 90 degrees apart, norms 2 and 4
    (out, _), = fc.conditioning_transition([cond(a, b), None], 3, "slerp")[0]
    mid = out[1, 0]
    # halfway: 45 degrees, norm 3 (norms interpolate linearly)
    torch.testing.assert_close(mid, torch.tensor([3 / 2 ** 0.5, 3 / 2 ** 0.5]))


def test_different_token_lengths_repeat_to_common_multiple(fc):
    g = torch.Generator().manual_seed(1)
    start = torch.randn(1, 77, 16, generator=g)
    end = torch.randn(1, 154, 16, generator=g)
    (out, _), = fc.conditioning_transition([cond(start), cond(end)], 4, "linear")[0]
    assert out.shape == (4, 154, 16)
    assert torch.equal(out[0], torch.cat([start[0], start[0]], 0))
    assert torch.equal(out[-1], end[0])
    # the repetition is neutral for cross-attention: same output as the 77-token original
    q = torch.randn(1, 9, 16, generator=g)
    sdpa = torch.nn.functional.scaled_dot_product_attention
    torch.testing.assert_close(sdpa(q, out[:1], out[:1]), sdpa(q, start, start))
    # 154 vs 231 tokens -> 462 (least common multiple)
    (out, _), = fc.conditioning_transition([cond(end), cond(torch.randn(1, 231, 16))], 2)[0]
    assert out.shape[1] == 462


def test_pooled_output_per_frame(fc, errors):
    g = torch.Generator().manual_seed(2)
    keys, pooled = torch.randn(2, 77, 20, generator=g), torch.randn(2, 12, generator=g)
    (out, extras), = fc.conditioning_transition([cond(keys, pooled=pooled), None], 5, "linear")[0]
    p = extras["pooled_output"]
    assert p.shape == (5, 12)
    torch.testing.assert_close(p[2], (pooled[0] + pooled[1]) / 2)
    assert torch.equal(p[0], pooled[0]) and torch.equal(p[-1], pooled[1])
    with pytest.raises(errors.NodeInputError, match="pooled_output"):
        fc.conditioning_transition([cond(keys[:1], pooled=pooled[:1]), cond(keys[1:])], 5)


def test_bad_inputs(fc, errors):
    one = cond(torch.randn(1, 77, 8))
    with pytest.raises(errors.NodeInputError, match="at least 2 keyframes"):
        fc.conditioning_transition([one, None], 4)
    with pytest.raises(errors.NodeInputError, match="exactly one entry"):
        fc.conditioning_transition([one + one, None], 4)
    with pytest.raises(errors.NodeInputError, match="channel width"):
        fc.conditioning_transition([one, cond(torch.randn(1, 77, 9))], 4)

# The node itself with CLIPTextEncode outputs of 77 and 154 tokens runs in test_transition_workflows.py
# (transition_video.json's end prompt is longer than 77 tokens).


def transition_prompt(batch):
    transition = {"keyframes": ["2", 0], "end": ["3", 0], "frames_per_transition": 3, "interpolation": "linear",
                  "latent": ["4", 0]}
    return {
        "1": {"class_type": "SDNTest_TinyCheckpoint", "inputs": {"kind": "sd15", "seed": 0}},
        "2": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["1", 1], "text": "a lighthouse at dawn"}},
        "3": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["1", 1], "text": "a lighthouse at night"}},
        "4": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": batch}},
        "5": {"class_type": "SDN_ConditioningTransition", "inputs": transition},
        "6": {"class_type": "PreviewAny", "inputs": {"source": ["5", 1]}},
    }


def test_latent_of_another_frame_count_is_refused_through_the_executor(host):
    # ComfyUI would repeat or cut conditioning rows to the latent batch silently: a connected latent must match.
    import sdn_host

    with pytest.raises(sdn_host.WorkflowError, match=r"SDN_ConditioningTransition: input 'latent': "
                                                     r"expected a latent batch of 3 frames.*got a batch of 4"):
        host.run(transition_prompt(4))
    res = host.run(transition_prompt(3))
    assert res.node_output("5", 1) == 3 and res.node_output("5", 0)[0][0].shape[0] == 3
    # without it (saved workflows) the node runs as before: test_transition_workflows.py
