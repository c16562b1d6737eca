"""Shared by the sampling tests: independent attention oracles and a real-sampler runner."""
import math

import torch


def mha(q, k, v, heads):
    d = q.shape[-1] // heads
    qh, kh, vh = (t.reshape(t.shape[0], heads, d).transpose(0, 1) for t in (q, k, v))
    w = torch.softmax(qh @ kh.transpose(1, 2) / math.sqrt(d), dim=-1)
    return (w @ vh).transpose(0, 1).reshape(q.shape[0], -1)


def oracle(refs=0, partners=None):
    """Independent CSA at rate 1: union of the group (or of the references); ``partners(i, b)``: the images
    image i shares with (sliding windows)."""
    def replace(q, k, v, extra):
        heads, rows = extra["n_heads"], q.shape[0]
        chunks = len(extra["cond_or_uncond"])
        if rows != extra["original_shape"][0]:
            return torch.stack([mha(q[r], k[r], v[r], heads) for r in range(rows)])
        b = rows // chunks
        cw = extra.get("context_window")
        absolute = list(cw.index_list) if cw is not None else list(range(b))
        ref_pos = [p for p, a in enumerate(absolute) if a < refs]
        out = torch.empty_like(q)
        for ch in range(chunks):
            rs = list(range(ch * b, ch * b + b))
            for i, row in enumerate(rs):
                if partners is not None:
                    group = [row] + [rs[j] for j in partners(i, b)]
                elif not ref_pos:
                    group = rs
                elif i in ref_pos:
                    group = [rs[p] for p in ref_pos]
                else:
                    group = [row] + [rs[p] for p in ref_pos]
                out[row] = mha(q[row], k[group].reshape(-1, k.shape[-1]), v[group].reshape(-1, v.shape[-1]), heads)
        return out
    return replace


def with_oracle(model, refs=0, partners=None):
    m = model.clone()
    for number in range(12):
        for depth in range(10):
            m.set_model_attn1_replace(oracle(refs, partners), "output", number, depth)
    return m


def csa_model(pack, model, rate=1.0, refs=0, seed=0, schedule="always", blocks=("output",), tile_size=0):
    patch = pack("attention.patch")
    s = patch.CSASettings(rates=((8, rate), (16, rate), (32, rate)), reference_count=refs, seed=seed,
                          schedule=schedule, blocks=blocks, tile_size=tile_size)
    return patch.apply_csa(model, s)


def record_chunks(model, log, log_rows=None):
    log_rows = [] if log_rows is None else log_rows

    def wrapper(apply_model, args):
        log.append(list(args["cond_or_uncond"]))
        log_rows.append(args["input"].shape[0] // len(args["cond_or_uncond"]))
        return apply_model(args["input"], args["timestep"], **args["c"])
    model.set_model_unet_function_wrapper(wrapper)
    return model


def sample(model, b, cfg=5.0, steps=2, seed=0, kind="sd15", size=16, positive=None, sampler="euler"):
    """Sample a ``b``-image batch with the stock sampler; ``size``: latent side, or (height, width)."""
    import comfy.sample

    ctx = 64
    gen = torch.Generator().manual_seed(123)
    extra = (lambda n: {"pooled_output": torch.randn(n, 1280, generator=gen)}) if kind == "sdxl" else (lambda n: {})
    if positive is None:
        positive = [[torch.randn(b, 77, ctx, generator=gen), extra(b)]]
    negative = [[torch.randn(1, 77, ctx, generator=gen), extra(1)]]
    h, w = (size, size) if isinstance(size, int) else size
    latent = torch.zeros(b, 4, h, w)
    noise = comfy.sample.prepare_noise(latent, seed)
    return comfy.sample.sample(model, noise, steps, cfg, sampler, "normal", positive, negative, latent,
                               seed=seed, disable_pbar=True)


def close(a, b):
    torch.testing.assert_close(a, b, atol=2e-4, rtol=2e-4)


def mha_batch(q, k, v, heads):
    return torch.stack([mha(q[r], k[r], v[r], heads) for r in range(q.shape[0])])


def core_context_window(index_list, total_frames):
    """ComfyUI's own ``IndexListContextWindow`` over the absolute frames ``index_list`` of ``total_frames``.

    Current ComfyUI needs the total (it divides by it); 0.3.75 takes no such argument."""
    import inspect

    import comfy.context_windows as cw

    takes_total = "total_frames" in inspect.signature(cw.IndexListContextWindow).parameters
    return cw.IndexListContextWindow(list(index_list), **({"total_frames": total_frames} if takes_total else {}))


def windowed(model, index_list, anchor=None, total_frames=6):
    """A clone whose model calls carry a core context window of a ``total_frames`` video (current ComfyUI's
    shape, rows = [anchor] + index_list, when ``anchor`` is set)."""
    m = model.clone()
    window = core_context_window(index_list, total_frames=total_frames)
    if anchor is not None:
        window.causal_anchor_index = anchor
    m.model_options["transformer_options"]["context_window"] = window
    return m
