"""The motion predictor and the IP-Adapter go through ComfyUI's model management, and running them leaves the
loader nodes' cached outputs as they were.

Graphs run through the real executor with one executor for two prompts, so the second prompt reuses the
loaders' cached outputs as ComfyUI's server does between queued prompts. A spy on
``comfy.model_management.load_models_gpu`` / ``LoadedModel.model_load`` records which ModelPatchers each load
brought onto the torch device: the predictor and the image projector must be among them when they run, and the
adapter's ModelPatcher must be loaded together with the UNet for sampling (ComfyUI reads it from the attn2
patches' ``models()``).
"""
import collections
import uuid
from pathlib import Path

import numpy as np
import pytest
import torch

from clip_vision_models import SHAPES, load_clip_vision, loader_node, write_clip_vision

CV_NODE = "SDNTestMM_SmallClipVision"
UNET_NODE = "SDNTestMM_SmallUnet"
PRED = "sdn-mm-smp-small.safetensors"
IPA = "sdn-mm-plus-small.safetensors"
L = 3


@pytest.fixture(scope="module")
def files(host, pack, tmp_path_factory):
    """A small CLIP vision loader node, a "trained" predictor and a tiny IP-Adapter plus for it, 2 keyframes."""
    import folder_paths
    import safetensors.torch
    import skimage.data
    from PIL import Image

    from test_ip_adapter_injection import make_ip_state_dict
    from test_transition_workflows import tiny_cross_attention_dims

    cv = load_clip_vision(write_clip_vision(tmp_path_factory.mktemp("cv") / "small.safetensors", "small"))

    class SmallUnet:  # SDNTest_TinyCheckpoint's UNet without its CLIP and VAE (seconds to build)
        @classmethod
        def INPUT_TYPES(cls):
            return {"required": {}}

        RETURN_TYPES = ("MODEL", "CONDITIONING", "CONDITIONING")
        FUNCTION = "load"
        CATEGORY = "_for_testing"

        def load(self):
            from models import small_unet

            gen = torch.Generator().manual_seed(3)
            return (small_unet("sd15", context_dim=768), [[torch.randn(1, 77, 768, generator=gen), {}]],
                    [[torch.randn(1, 77, 768, generator=gen), {}]])

    host.nodes.NODE_CLASS_MAPPINGS[CV_NODE] = loader_node(cv)
    host.nodes.NODE_CLASS_MAPPINGS[UNET_NODE] = SmallUnet
    tokens, width, _ = SHAPES["small"]
    pred, ckpt = pack("motion.predictor"), pack("motion.checkpoint")
    p = pred.SemanticMotionPredictor(pred.make_config(token_count=tokens, token_dim=width, width=32, layers=1, heads=4))
    torch.nn.init.normal_(p.out_proj.weight, std=0.05)  # "trained": inner frames leave the interpolation
    folder = host.base_directory / "models" / "motion_predictors"
    folder.mkdir(parents=True, exist_ok=True)
    ckpt.save_predictor(p, folder / PRED, overwrite=True)
    pack("nodes.transition_nodes").ipadapter_files()
    ipa = Path(folder_paths.get_folder_paths("ipadapter")[0])
    ipa.mkdir(parents=True, exist_ok=True)
    safetensors.torch.save_file(make_ip_state_dict("plus", tiny_cross_attention_dims(pack), cross=768, clip_dim=width,
                                                   tokens=4, depth=1, seed=10, nested=False), str(ipa / IPA))
    inputs = folder_paths.get_input_directory()
    for name, img in (("sdn_mm_start.png", skimage.data.astronaut()), ("sdn_mm_end.png", skimage.data.chelsea())):
        Image.fromarray(np.asarray(img)).convert("RGB").resize((64, 64)).save(f"{inputs}/{name}")
    yield
    host.nodes.NODE_CLASS_MAPPINGS.pop(CV_NODE, None)
    host.nodes.NODE_CLASS_MAPPINGS.pop(UNET_NODE, None)


@pytest.fixture
def loads(monkeypatch):
    """Per ``load_models_gpu`` call, the ModelPatchers it loaded (``LoadedModel.model_load``), in call order."""
    import comfy.model_management as mm

    calls = []
    load_models_gpu, model_load = mm.load_models_gpu, mm.LoadedModel.model_load

    def spy_load_models_gpu(models, *args, **kwargs):
        calls.append([])
        return load_models_gpu(models, *args, **kwargs)

    def spy_model_load(self, *args, **kwargs):
        calls[-1].append(self.model)
        return model_load(self, *args, **kwargs)

    monkeypatch.setattr(mm, "load_models_gpu", spy_load_models_gpu)
    monkeypatch.setattr(mm.LoadedModel, "model_load", spy_model_load)
    return calls


class Session:
    """One PromptExecutor for several prompts: cached outputs of unchanged nodes are reused between them."""

    def __init__(self, host):
        self.host = host
        self.executor = host.execution.PromptExecutor(host.server, cache_type=host.execution.CacheType.CLASSIC,
                                                      cache_args=collections.defaultdict(float))

    def run(self, prompt):
        import sdn_host

        valid = self.host.validate(prompt)
        assert valid[0], valid
        self.host.server.messages.clear()
        self.executor.execute(prompt, str(uuid.uuid4()), {"client_id": "sdn-host"}, valid[2])
        errors = [d for e, d in self.host.server.messages if e == "execution_error"]
        assert self.executor.success, errors
        return sdn_host.RunResult(self.executor.history_result["outputs"], self.executor)


def embeds_graph(frames_per_transition=L):
    """Predictor loader -> SDN_TransitionEmbeds ("te") on two keyframes."""
    return {"cv": {"class_type": CV_NODE, "inputs": {}},
            "pred": {"class_type": "SDN_MotionPredictorLoader", "inputs": {"predictor_name": PRED}},
            "a": {"class_type": "LoadImage", "inputs": {"image": "sdn_mm_start.png"}},
            "b": {"class_type": "LoadImage", "inputs": {"image": "sdn_mm_end.png"}},
            "ab": {"class_type": "ImageBatch", "inputs": {"image1": ["a", 0], "image2": ["b", 0]}},
            "te": {"class_type": "SDN_TransitionEmbeds", "inputs": {
                "clip_vision": ["cv", 0], "keyframes": ["ab", 0], "frames_per_transition": frames_per_transition,
                "interpolation": "linear", "embeds_kind": "penultimate_hidden_states", "crop": "center",
                "predictor": ["pred", 0]}},
            "show": {"class_type": "PreviewAny", "inputs": {"source": ["te", 0]}}}


def only(graph, *keep):
    """The nodes ``keep`` of ``graph`` (loaders), each shown by a PreviewAny so that the prompt has outputs."""
    g = {k: graph[k] for k in keep}
    g.update({f"show_{k}": {"class_type": "PreviewAny", "inputs": {"source": [k, 0]}} for k in keep})
    return g


def state(module):
    """(parameter object, device, dtype) of every parameter and buffer."""
    return [(t, t.device, t.dtype) for t in [*module.parameters(), *module.buffers()]]


def unchanged(module, before) -> bool:
    """The same tensor objects as ``before`` (from :func:`state`), on the same devices, in the same dtypes."""
    now = state(module)
    return len(now) == len(before) and all(a is b and (da, ta) == (db, tb)
                                           for (a, da, ta), (b, db, tb) in zip(now, before))


def with_unet(loaded, model) -> bool:
    """Whether a load brought a patcher of ``model``'s UNet (the sampler may load a clone of it)."""
    return any(m.is_clone(model) for m in loaded)


def test_predictor_runs_under_model_management_and_stays_as_loaded(host, pack, files, loads):
    import comfy.model_patcher

    session = Session(host)
    first = session.run(embeds_graph())
    predictor = first.node_output("pred")
    assert isinstance(predictor, comfy.model_patcher.ModelPatcher)
    assert isinstance(predictor.model, pack("motion.predictor").SemanticMotionPredictor)
    assert any(predictor in loaded for loaded in loads)  # SDN_TransitionEmbeds loaded it through ComfyUI
    before = state(predictor.model)
    embeds = first.node_output("te")
    # a later prompt reuses the cached predictor: same object, untouched, same result (the prompt in between drops
    # the other nodes' cached outputs, so ComfyUI runs SDN_TransitionEmbeds again)
    session.run(only(embeds_graph(), "pred"))
    loads.clear()
    third = session.run(embeds_graph())
    assert third.node_output("pred") is predictor
    assert any(predictor in loaded for loaded in loads)
    assert unchanged(predictor.model, before)
    assert torch.equal(third.node_output("te"), embeds)
    # the predictor acted (inner frame off the line), the keyframes are exact
    assert (embeds[1] - (embeds[0] + embeds[2]) / 2).abs().amax() > 1e-3
    info = pack("nodes.motion_nodes").MotionPredictorInfo.execute(predictor)
    assert '"token_count": 50' in info.result[0]


def video_graph():
    """Embeds (no predictor) -> IP-Adapter on a small SD1.5 UNet -> one sampling step over the frames."""
    g = embeds_graph()
    del g["te"]["inputs"]["predictor"], g["pred"], g["show"]
    g.update({
        "unet": {"class_type": UNET_NODE, "inputs": {}},
        "ipa": {"class_type": "SDN_IPAdapterLoader", "inputs": {"ipadapter_name": IPA}},
        "apply": {"class_type": "SDN_ApplyTransitionEmbeds", "inputs": {
            "model": ["unet", 0], "ipadapter": ["ipa", 0], "embeds": ["te", 0], "weight": 1.0,
            "start_percent": 0.0, "end_percent": 1.0, "negative_embeds": ["te", 1]}},
        "latent": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": L}},
        "ks": {"class_type": "KSampler", "inputs": {
            "model": ["apply", 0], "seed": 1, "steps": 1, "cfg": 5.0, "sampler_name": "euler",
            "scheduler": "normal", "positive": ["unet", 1], "negative": ["unet", 2], "latent_image": ["latent", 0],
            "denoise": 1.0}},
        "show": {"class_type": "PreviewAny", "inputs": {"source": ["ks", 0]}},
    })
    return g


def test_ip_adapter_is_loaded_with_the_unet_and_stays_as_loaded(host, pack, files, loads):
    session = Session(host)
    first = session.run(video_graph())
    adapter = first.node_output("ipa")
    model = first.node_output("apply")
    # the image projection ran through model management (SDN_ApplyTransitionEmbeds)
    apply_load = next(i for i, loaded in enumerate(loads) if adapter.patcher in loaded)
    # sampling: the adapter's k/v projections are loaded together with the UNet (attn2 patches' models())
    assert any(with_unet(loaded, model) and adapter.patcher in loaded for loaded in loads[apply_load + 1:])
    assert adapter.patcher in model.model_patches_models()
    before = state(adapter.patcher.model)
    latent = first.node_output("ks")["samples"]
    session.run(only(video_graph(), "unet", "ipa"))  # drops the other cached outputs: the next prompt samples again
    loads.clear()
    third = session.run(video_graph())
    assert third.node_output("ipa") is adapter
    assert unchanged(adapter.patcher.model, before)
    assert any(with_unet(loaded, model) and adapter.patcher in loaded for loaded in loads)
    assert torch.equal(third.node_output("ks")["samples"], latent)


def test_attn2_patch_to_returns_a_new_patch(pack, files):
    # ComfyUI calls patch.to(device) and patch.to(model dtype) on the patcher being loaded, replacing the entry:
    # the patch handed out by SDN_ApplyTransitionEmbeds (a cached output) must not change.
    ipmod = pack("motion.ip_adapter")
    from test_ip_adapter_injection import make_ip_state_dict

    adapter = ipmod.parse_state_dict(make_ip_state_dict("plus", [32], cross=64, clip_dim=48, tokens=4, depth=1))
    pos = torch.randn(2, 4, 64)
    patch = ipmod.IPAdapterAttn2(adapter.patcher, 0, pos, -pos, 1.0)
    half = patch.to(torch.float16)
    assert half is not patch and half.pos.dtype == torch.float16
    assert patch.pos is pos and pos.dtype == torch.float32
    moved = patch.to(torch.device("cpu"))
    assert moved is not patch and moved.models() == [adapter.patcher]
