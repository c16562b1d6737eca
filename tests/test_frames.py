"""Absolute frame indices of a model call's rows under every context-window layout (attention/frames.py).

Window objects carry what ComfyUI's ``IndexListContextWindow`` carries: ``index_list``, and on current ComfyUI
(causal_window_fix, on by default since 0.33: an anchor frame put in front of every window after the first)
``causal_anchor_index`` and ``total_frames``. Through the real sampler: test_csa_sampling.py and
test_ip_adapter_injection.py.
"""
from types import SimpleNamespace

import pytest


NODE = "SDN_Test"


@pytest.fixture(scope="module")
def frames(pack):
    return pack("attention.frames")


def core_window(index_list, anchor=None):
    window = SimpleNamespace(index_list=list(index_list))
    if anchor is not None:
        window.causal_anchor_index = anchor
    return window


def test_no_window_is_none(frames):
    assert frames.window_frames({}, 4, NODE) is None
    # AnimateDiff-Evolved without windows: sub_idxs None, the call holds the whole video
    assert frames.window_frames({"ad_params": {"sub_idxs": None, "full_length": 4}}, 4, NODE) is None


def test_core_window_old_and_new_shapes(frames):
    assert frames.window_frames({"context_window": core_window([3, 4, 5])}, 3, NODE) == [3, 4, 5]
    # current ComfyUI: the anchor frame comes first, the call has len(index_list) + 1 rows
    assert frames.window_frames({"context_window": core_window([3, 4, 5], anchor=2)}, 4, NODE) == [2, 3, 4, 5]
    # the first window gets no anchor (-1 / unset): rows are the index list
    assert frames.window_frames({"context_window": core_window([0, 1, 2], anchor=-1)}, 3, NODE) == [0, 1, 2]


def test_animatediff_evolved_sub_idxs(frames):
    ad = {"ad_params": {"sub_idxs": [4, 5, 0, 1], "full_length": 6, "context_length": 4}}
    assert frames.window_frames(ad, 4, NODE) == [4, 5, 0, 1]


def test_window_that_does_not_describe_the_rows_is_refused(frames, pack):
    errors = pack("errors")
    with pytest.raises(errors.StoryDiffusionError, match="SDN_Test: .*3 frames.*4 latent rows"):
        frames.window_frames({"context_window": core_window([3, 4, 5])}, 4, NODE)
    with pytest.raises(errors.StoryDiffusionError, match="2 frames.*3 latent rows"):
        frames.window_frames({"ad_params": {"sub_idxs": [0, 1], "full_length": 6}}, 3, NODE)


def test_video_length(frames):
    assert frames.video_length({}) is None
    assert frames.video_length({"ad_params": {"sub_idxs": [0, 1], "full_length": 6}}) == 6
    assert frames.video_length({"context_window": core_window([0, 1])}) is None  # ComfyUI 0.3.75: not known
    window = core_window([3, 4, 5], anchor=2)
    window.total_frames = 8  # current ComfyUI: IndexListContextWindow(..., total_frames=latent frames)
    assert frames.video_length({"context_window": window}) == 8
