"""The shipped transition workflows: static validation of the whole UI JSON, then execution of everything but
AnimateDiff-Evolved through the real ComfyUI host.

AnimateDiff-Evolved cannot be installed here, so its node definitions are a table below, read from its source
(github Kosinkadink/ComfyUI-AnimateDiff-Evolved, animatediff/nodes_gen2.py and nodes_context.py at d8d163c).
For execution its nodes are dropped (ADE_UseEvolvedSampling's MODEL consumers get its model input), the
checkpoint becomes the test-only SDNTest_TinyCheckpoint (real SD1.5 layout, tiny widths, real CLIP-L and
VAE, random weights), and files/sizes are small: ViT-H/14 CLIP vision with random weights through the stock
CLIPVisionLoader (the one place in these tests with real ViT-H shapes), a tiny IP-Adapter plus with the real
key layout, a tiny motion predictor, 64 px keyframes, 3 frames per transition, 2 sampling steps.
"""
import copy
import json
from pathlib import Path

import pytest
import torch

from clip_vision_models import SHAPES, load_clip_vision, loader_node, shared_clip_vision, write_clip_vision

REPO = Path(__file__).resolve().parent.parent
VIT_H_NAME = "sdn-random-vit-h.safetensors"
IPA_NAME = "sdn-test-plus-tiny.safetensors"
PRED_NAME = "sdn-test-smp-vit-h.safetensors"
IPA_SMALL = "sdn-test-plus-tiny-small-cv.safetensors"
PRED_SMALL = "sdn-test-smp-small-cv.safetensors"
SMALL_CV_NODE = "SDNTestTransitions_SmallClipVision"
L = 3

# AnimateDiff-Evolved node definitions this pack's workflows use: inputs (name, type, is_widget) in
# definition order (required then optional), outputs (types).
ADE_NODES = {
    "ADE_LoadAnimateDiffModel": {
        "inputs": [("model_name", "COMBO", True), ("ad_settings", "AD_SETTINGS", False)],
        "required": ["model_name"], "outputs": ["MOTION_MODEL_ADE"]},
    "ADE_ApplyAnimateDiffModelSimple": {
        "inputs": [("motion_model", "MOTION_MODEL_ADE", False), ("motion_lora", "MOTION_LORA", False),
                   ("scale_multival", "MULTIVAL", False), ("effect_multival", "MULTIVAL", False),
                   ("ad_keyframes", "AD_KEYFRAMES", False), ("per_block", "PER_BLOCK", False)],
        "required": ["motion_model"], "outputs": ["M_MODELS"]},
    "ADE_StandardUniformContextOptions": {
        "inputs": [("context_length", "INT", True), ("context_stride", "INT", True), ("context_overlap", "INT", True),
                   ("fuse_method", "COMBO", True), ("use_on_equal_length", "BOOLEAN", True),
                   ("start_percent", "FLOAT", True), ("guarantee_steps", "INT", True),
                   ("prev_context", "CONTEXT_OPTIONS", False), ("view_opts", "VIEW_OPTS", False)],
        "required": ["context_length", "context_stride", "context_overlap"], "outputs": ["CONTEXT_OPTIONS"]},
    "ADE_UseEvolvedSampling": {
        "inputs": [("model", "MODEL", False), ("beta_schedule", "COMBO", True), ("m_models", "M_MODELS", False),
                   ("context_options", "CONTEXT_OPTIONS", False), ("sample_settings", "SAMPLE_SETTINGS", False)],
        "required": ["model", "beta_schedule"], "outputs": ["MODEL"]},
}
UI_ONLY = {"Note", "MarkdownNote"}


def load(name):
    return json.loads((REPO / "workflows" / name).read_text())


def definition(host, node_type):
    """(inputs [(name, type, is_widget, ui_widget_count)], required names, output types) of a node."""
    import sdn_host

    if node_type in ADE_NODES:
        d = ADE_NODES[node_type]
        return [(n, t, w, 1 if w else 0) for n, t, w in d["inputs"]], d["required"], d["outputs"]
    cls = host.nodes.NODE_CLASS_MAPPINGS[node_type]
    spec = cls.INPUT_TYPES()
    inputs, required = [], list(spec.get("required", {}))
    for section in ("required", "optional"):
        for name, d in spec.get(section, {}).items():
            typ, opts = d[0], (d[1] if len(d) > 1 else {})
            widget = sdn_host._is_widget(typ, opts)
            extra = (1 if opts.get("control_after_generate") else 0) + (1 if opts.get("image_upload") else 0)
            inputs.append((name, "COMBO" if isinstance(typ, list) else typ, widget, (1 + extra) if widget else 0))
    return inputs, required, list(cls.RETURN_TYPES)


def validate(host, wf):
    nodes = {n["id"]: n for n in wf["nodes"]}
    assert len(nodes) == len(wf["nodes"]) and wf["version"] == 0.4
    defs = {}
    for n in wf["nodes"]:
        if n["type"] in UI_ONLY:
            continue
        assert n["type"] in host.nodes.NODE_CLASS_MAPPINGS or n["type"] in ADE_NODES, f"unknown node {n['type']}"
        defs[n["id"]] = definition(host, n["type"])
        inputs, required, outputs = defs[n["id"]]
        want = sum(c for *_, c in inputs)
        assert len(n.get("widgets_values") or []) == want, f"node {n['id']} {n['type']}: widget count"
        saved = [o["type"] for o in n["outputs"]]
        if n["type"] in host.nodes.NODE_CLASS_MAPPINGS and not n["type"].startswith("SDN_"):
            outputs = outputs[:len(saved)]  # newer ComfyUI may add outputs to a core node (SaveAnimatedWEBP)
        assert saved == outputs, f"node {n['id']} {n['type']}: outputs"
        linked = {i["name"] for i in n["inputs"] if i.get("link") is not None}
        names = {i[0]: i for i in inputs}
        for name in required:
            assert names[name][2] or name in linked, f"node {n['id']} {n['type']}: required input {name} unlinked"
        for i in n["inputs"]:
            assert i["name"] in names, f"node {n['id']} {n['type']}: no input {i['name']}"
    seen = set()
    for lid, src, sslot, dst, dslot, typ in wf["links"]:
        assert lid not in seen
        seen.add(lid)
        s, d = nodes[src], nodes[dst]
        assert defs[src][2][sslot] == typ, f"link {lid}: producer {s['type']} slot {sslot} is not {typ}"
        assert lid in (s["outputs"][sslot]["links"] or [])
        inp = d["inputs"][dslot]
        assert inp["link"] == lid and inp["type"] == typ, f"link {lid}: consumer socket"
        spec = {i[0]: i for i in defs[dst][0]}[inp["name"]]
        assert spec[1] == typ, f"link {lid}: {d['type']}.{inp['name']} takes {spec[1]}, gets {typ}"
    assert wf["last_link_id"] >= max(seen) and wf["last_node_id"] >= max(nodes)
    return nodes


@pytest.mark.parametrize("name", ["transition_video.json", "story_to_video.json"])
def test_workflow_json_is_consistent(host, name):
    wf = load(name)
    nodes = validate(host, wf)
    types = {n["type"] for n in nodes.values()}
    for needed in ("SDN_TransitionEmbeds", "SDN_IPAdapterLoader", "SDN_ApplyTransitionEmbeds",
                   "SDN_ConditioningTransition", "CLIPVisionLoader", "SDN_MotionPredictorLoader", "KSampler",
                   "VAEDecode", "SaveAnimatedWEBP", *ADE_NODES):
        assert needed in types, needed
    if name == "story_to_video.json":
        assert {"SDN_ConsistentSelfAttention", "SDN_StoryPrompt", "CheckpointLoaderSimple"} <= types
    # the latent batch of the video comes from frame_count; both per-frame nodes use the same frame count
    by_type = {}
    for n in nodes.values():
        by_type.setdefault(n["type"], []).append(n)
    te, ct = by_type["SDN_TransitionEmbeds"][0], by_type["SDN_ConditioningTransition"][0]
    assert te["widgets_values"][0] == ct["widgets_values"][0]


def test_validation_catches_a_bad_link(host):
    wf = load("transition_video.json")
    bad = copy.deepcopy(wf)
    link = next(l for l in bad["links"] if l[5] == "EMBEDS")
    link[2] = 2  # clip_vision_output socket into an EMBEDS input
    with pytest.raises(AssertionError):
        validate(host, bad)


# ---------------------------------------------------------------------------------------------------
# execution

def tiny_cross_attention_dims(pack):
    from models import small_unet

    ipmod = pack("motion.ip_adapter")
    return [a.to_k.weight.shape[0] for _, a in ipmod.cross_attention_blocks(small_unet("sd15", context_dim=768))]


@pytest.fixture(scope="module")
def assets(host, pack, tmp_path_factory):
    """Model files and keyframe images for the runnable part of the workflows."""
    import folder_paths
    import safetensors.torch
    import skimage.data
    from PIL import Image

    from test_ip_adapter_injection import make_ip_state_dict

    models = Path(folder_paths.models_dir)
    vit_h = models / "clip_vision" / VIT_H_NAME
    vit_h.parent.mkdir(parents=True, exist_ok=True)
    if not vit_h.exists():  # the session's one ViT-H file (also used by the predictor tests)
        vit_h.symlink_to(shared_clip_vision(tmp_path_factory, "vit_h"))
    pack("nodes.transition_nodes").ipadapter_files()
    ipa = Path(folder_paths.get_folder_paths("ipadapter")[0]) / IPA_NAME
    ipa.parent.mkdir(parents=True, exist_ok=True)
    safetensors.torch.save_file(make_ip_state_dict("plus", tiny_cross_attention_dims(pack), cross=768, clip_dim=1280,
                                                   tokens=4, depth=1, seed=9, nested=False), str(ipa))
    pred = pack("motion.predictor")
    ckpt = pack("motion.checkpoint")
    p = pred.SemanticMotionPredictor(pred.make_config(token_count=257, token_dim=1280, width=32, layers=1, heads=4))
    (models / "motion_predictors").mkdir(parents=True, exist_ok=True)
    ckpt.save_predictor(p, models / "motion_predictors" / PRED_NAME)
    # the small CLIP vision stand-in (story workflow): its own adapter and predictor widths
    tokens, width, _ = SHAPES["small"]
    safetensors.torch.save_file(make_ip_state_dict("plus", tiny_cross_attention_dims(pack), cross=768, clip_dim=width,
                                                   tokens=4, depth=1, seed=10, nested=False),
                                str(ipa.parent / IPA_SMALL))
    p = pred.SemanticMotionPredictor(pred.make_config(token_count=tokens, token_dim=width, width=32, layers=1, heads=4))
    torch.nn.init.normal_(p.out_proj.weight, std=0.05)  # a "trained" predictor: inner frames move off the line
    ckpt.save_predictor(p, models / "motion_predictors" / PRED_SMALL)
    inputs = Path(folder_paths.get_input_directory())
    for fname, img in (("keyframe_start.png", skimage.data.astronaut()), ("keyframe_end.png", skimage.data.chelsea())):
        Image.fromarray(img).convert("RGB").resize((64, 64)).save(inputs / fname)
    return True


@pytest.fixture(scope="module")
def small_cv_node(host, tmp_path_factory):
    """A test-only loader node giving the small CLIP vision model (ViT-H class, 2 layers): the stock
    CLIPVisionLoader only recognises full-size encoders, and ViT-H encodes cost seconds each on a CPU."""
    cv = load_clip_vision(write_clip_vision(tmp_path_factory.mktemp("cvs") / "small.safetensors", "small"))

    host.nodes.NODE_CLASS_MAPPINGS[SMALL_CV_NODE] = loader_node(cv)
    yield SMALL_CV_NODE
    host.nodes.NODE_CLASS_MAPPINGS.pop(SMALL_CV_NODE, None)


def runnable(wf, small_cv=False):
    """Drop AnimateDiff-Evolved (rewire its MODEL to its model input), swap in small models and sizes.
    ``small_cv``: the small CLIP vision stand-in (and its adapter/predictor) instead of ViT-H."""
    wf = copy.deepcopy(wf)
    nodes = {n["id"]: n for n in wf["nodes"]}
    ade = {i for i, n in nodes.items() if n["type"] in ADE_NODES}
    use = next(i for i in ade if nodes[i]["type"] == "ADE_UseEvolvedSampling")
    model_link = next(l for l in wf["links"] if l[3] == use and nodes[use]["inputs"][l[4]]["name"] == "model")
    links = []
    for l in wf["links"]:
        if l[1] == use:
            l = [l[0], model_link[1], model_link[2], *l[3:]]
        if l[1] in ade or l[3] in ade:
            continue
        links.append(l)
    wf["links"] = links
    wf["nodes"] = [n for i, n in nodes.items() if i not in ade]
    for n in wf["nodes"]:
        t, w = n["type"], n["widgets_values"]
        if t == "CheckpointLoaderSimple":
            n["type"], n["widgets_values"] = "SDNTest_TinyCheckpoint", ["sd15", 0]
        elif t == "CLIPVisionLoader":
            if small_cv:
                n["type"], n["widgets_values"] = SMALL_CV_NODE, []
            else:
                w[0] = VIT_H_NAME
        elif t == "SDN_IPAdapterLoader":
            w[0] = IPA_SMALL if small_cv else IPA_NAME
        elif t == "SDN_MotionPredictorLoader":
            w[0] = PRED_SMALL if small_cv else PRED_NAME
        elif t in ("SDN_TransitionEmbeds", "SDN_ConditioningTransition"):
            w[0] = L
        elif t == "EmptyLatentImage":
            w[0] = w[1] = 64
        elif t == "KSampler":
            w[2] = 2
    return wf


def api(host, wf):
    import sdn_host

    return sdn_host.ui_to_api(wf, host.nodes.NODE_CLASS_MAPPINGS)


def by_type(prompt, t):
    return [k for k, v in prompt.items() if v["class_type"] == t]


def test_transition_video_runs(host, assets):
    import folder_paths

    prompt = api(host, runnable(load("transition_video.json")))
    res = host.run(prompt)
    te = by_type(prompt, "SDN_TransitionEmbeds")[0]
    embeds, negative = res.node_output(te, 0), res.node_output(te, 1)
    frames = res.node_output(te, 3)
    assert frames == L and embeds.shape == (L, 257, 1280) and negative.shape == embeds.shape
    cvo = res.node_output(te, 2)
    assert cvo["image_embeds"].shape == (L, 1024) and cvo["penultimate_hidden_states"] is embeds
    # (endpoint values against ComfyUI's own encodings: test_transition_embeds.py; ViT-H encodes cost seconds)
    assert (embeds[0] - embeds[-1]).abs().amax() > 1e-3  # two different keyframes
    assert torch.equal(negative[0], negative[-1])  # one black image for every frame
    # untrained predictor == interpolation: the middle frame is the mean of the keyframe encodings
    torch.testing.assert_close(embeds[1], (embeds[0] + embeds[2]) / 2, rtol=1e-4, atol=1e-4)
    # per-frame text: one entry with dim 0 = frames; the workflow's end prompt is longer than 77 tokens
    ct_id = by_type(prompt, "SDN_ConditioningTransition")[0]
    ct = res.node_output(ct_id)
    start = res.node_output(prompt[ct_id]["inputs"]["keyframes"][0])[0][0]
    end = res.node_output(prompt[ct_id]["inputs"]["end"][0])[0][0]
    assert (start.shape[1], end.shape[1]) == (77, 154)
    assert len(ct) == 1 and ct[0][0].shape == (L, 154, 768) and res.node_output(ct_id, 1) == L
    assert torch.equal(ct[0][0][0], start[0].repeat(2, 1)) and torch.equal(ct[0][0][-1], end[0])
    assert ct[0][1]["pooled_output"].shape == (L, 768)
    decoded = res.node_output(by_type(prompt, "VAEDecode")[0])
    assert decoded.shape[0] == L
    out = Path(folder_paths.get_output_directory()) / "storydiffusion"
    assert list(out.glob("transition*.webp"))


def test_story_to_video_runs_under_core_context_windows(host, assets, small_cv_node):
    prompt = api(host, runnable(load("story_to_video.json"), small_cv=True))
    # core context windows stand in for AnimateDiff-Evolved's: windows of 3 latents over the 5 frames
    apply_id = by_type(prompt, "SDN_ApplyTransitionEmbeds")[0]
    video_sampler = next(k for k in by_type(prompt, "KSampler") if prompt[k]["inputs"]["model"][0] == apply_id)
    prompt["900"] = {"class_type": "ContextWindowsManual", "inputs": {
        **host.default_inputs("ContextWindowsManual"),  # for inputs the node gained after 0.3.75
        "model": [apply_id, 0], "context_length": 3, "context_overlap": 1, "context_schedule": "standard_static",
        "fuse_method": "pyramid", "dim": 0}}
    prompt[video_sampler]["inputs"]["model"] = ["900", 0]
    # ComfyUI 0.3.75's IndexListContextHandler.set_step compares sample_sigmas (steps + 1) with the per-latent
    # timestep tensor elementwise: it only works when both have the same length, so steps = frames - 1.
    prompt[video_sampler]["inputs"]["steps"] = (3 - 1) * (L - 1)
    res = host.run(prompt)
    panels = res.node_output(by_type(prompt, "SDN_StoryPrompt")[0], 2)
    te = by_type(prompt, "SDN_TransitionEmbeds")[0]
    frames = res.node_output(te, 3)
    assert frames == (panels - 1) * (L - 1) + 1
    tokens, width, _ = SHAPES["small"]
    embeds = res.node_output(te, 0)
    assert embeds.shape == (frames, tokens, width)
    # keyframes = the decoded panels, at frames 0, L-1, ... (the trained predictor leaves them exact)
    cv = res.node_output(by_type(prompt, SMALL_CV_NODE)[0])
    panel_decode = next(k for k in by_type(prompt, "VAEDecode") if prompt[k]["inputs"]["samples"][0] != video_sampler)
    panel_images = res.node_output(panel_decode)
    with torch.inference_mode():
        ref = cv.encode_image(panel_images, crop=True)["penultimate_hidden_states"].float()
    for k in range(panels):
        torch.testing.assert_close(embeds[k * (L - 1)], ref[k], rtol=1e-3, atol=1e-3)
    ct = res.node_output(by_type(prompt, "SDN_ConditioningTransition")[0])
    assert ct[0][0].shape[0] == frames
    decoded = [res.node_output(k) for k in by_type(prompt, "VAEDecode")]
    assert sorted(d.shape[0] for d in decoded) == sorted([panels, frames])
