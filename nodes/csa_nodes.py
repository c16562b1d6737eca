"""SDN_ConsistentSelfAttention: patch a MODEL with StoryDiffusion's Consistent Self-Attention."""
from comfy_api.latest import io

from ..attention.dit import DIT_BLOCK_CHOICES, SUPPORTED
from ..attention.patch import BLOCK_CHOICES, SCHEDULE_CHOICES, CSASettings, apply_csa
from ..errors import NodeInputError

_RATE = dict(default=0.5, min=0.0, max=1.0, step=0.05)


class ConsistentSelfAttention(io.ComfyNode):
    """StoryDiffusion CSA (arXiv 2405.01434) on the stock sampler: every image of the latent batch attends to
    its own tokens plus a random subset of the other images' tokens, so characters stay consistent."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="SDN_ConsistentSelfAttention",
            display_name="Consistent Self-Attention (StoryDiffusion)",
            category="StoryDiffusion/attention",
            description=cls.__doc__,
            inputs=[
                io.Model.Input("model", tooltip=(
                    f"SD1.x, SD2.x or SDXL model, or a DiT: {SUPPORTED} (LoRAs and other patches are kept).")),
                io.Float.Input("sampling_rate_1_32", **_RATE, tooltip=(
                    "Share of another image's tokens each image sees, in layers at 1/32 of the image size "
                    "(and coarser). The reference app's sa32. 0 = plain self-attention, 1 = all tokens.")),
                io.Float.Input("sampling_rate_1_16", **_RATE, tooltip=(
                    "Same for layers at 1/16 of the image size (the reference app's sa64). DiT models have all their "
                    "image tokens at 1/16 (VAE 8 x patch 2; Flux.2: VAE 16 x patch 1): this rate applies to every "
                    "patched DiT block.")),
                io.Float.Input("sampling_rate_1_8", **_RATE, tooltip=(
                    "Same for layers at 1/8 of the image size (SD1.x/SD2.x only; SDXL has none).")),
                io.Int.Input("reference_count", default=0, min=0, max=64, tooltip=(
                    "0: every image attends to every other image (the paper). R > 0: the first R images of the "
                    "batch are references; they share among themselves and every other image attends to the same "
                    "sampled tokens of the references, exactly those a character bank recorded from them would give "
                    "(cost grows with R, not with the batch).")),
                io.Int.Input("seed", default=0, min=0, max=0xFFFFFFFFFFFFFFFF, control_after_generate=True,
                             tooltip="Seed of the token sampling (re-drawn every step, deterministic per seed)."),
                io.Combo.Input("blocks", options=list(BLOCK_CHOICES), default="decoder", tooltip=(
                    "Which self-attention layers of a UNet get CSA. 'decoder' = the UNet's output blocks, as the "
                    "reference app. DiT models use dit_blocks.")),
                io.Float.Input("start_percent", default=0.0, min=0.0, max=1.0, step=0.01,
                               tooltip="Part of the sampling schedule where CSA starts (0 = first step)."),
                io.Float.Input("end_percent", default=1.0, min=0.0, max=1.0, step=0.01,
                               tooltip="Part of the sampling schedule where CSA ends (1 = last step)."),
                io.Combo.Input("schedule", options=list(SCHEDULE_CHOICES), default="always", tooltip=(
                    "'always': CSA at every step in range. 'storydiffusion': the reference app's heuristic: plain "
                    "attention at step 0, then each layer skips CSA at random with p = 0.3 (steps 1-19) or 0.1.")),
                io.Int.Input("tile_size", default=0, min=0, max=1024, tooltip=(
                    "Sliding window (paper, Algorithm 1): 0 = off; T > 1 = each image shares only with the T - 1 "
                    "images around it in the batch, so the extra keys per image stay bounded in long batches. "
                    "Only with reference_count 0.")),
                io.Combo.Input("dit_blocks", options=list(DIT_BLOCK_CHOICES), default="single-stream", optional=True,
                               tooltip=(
                    "Which blocks of a DiT get CSA in their joint attention (image queries also see the other "
                    "images' image tokens; text queries keep their own panel). 'single-stream' (default): the later "
                    "blocks (Flux.1 and Chroma: the 38 single-stream of 57; HiDream: its 32 single-stream of 48; Qwen-Image, "
                    "Lumina2, Z-Image and SD3/SD3.5, which have one kind of block: the later half, e.g. 30 of "
                    "Qwen-Image's 60; an SD3.5 Medium block's image-only attention goes with its block), as the reference app "
                    "patches the later half (the decoder) of a UNet. 'double-stream': the early blocks (Flux: the "
                    "19 double-stream; the others: the earlier half). Ignored for UNets.")),
                io.Boolean.Input("subject_masks", default=False, optional=True, tooltip=(
                    "Share only the characters, not the background (needs the model through Character Masks): an "
                    "image's extra keys are the sampled tokens of the other images that lie inside the mask of a "
                    "character its panel names; its own tokens stay visible. In a panel naming several characters, "
                    "image tokens inside A's mask see only A's tokens, inside B's only B's, elsewhere only their own "
                    "image. [NC] panels share nothing; the first step (no masks yet) shares nothing. DiTs too, in "
                    "their joint attention (text queries unchanged). Off: whole images, as the paper.")),
            ],
            outputs=[io.Model.Output(display_name="CSA model", tooltip="A patched clone; the input model is unchanged.")],
        )

    @classmethod
    def execute(cls, model, sampling_rate_1_32, sampling_rate_1_16, sampling_rate_1_8, reference_count, seed,
                blocks, start_percent, end_percent, schedule, tile_size=0, dit_blocks="single-stream",
                subject_masks=False) -> io.NodeOutput:
        node = "SDN_ConsistentSelfAttention"
        if start_percent > end_percent:
            raise NodeInputError(node, "start_percent", f"a value <= end_percent ({end_percent})",
                                 got=str(start_percent))
        if tile_size == 1:
            raise NodeInputError(node, "tile_size", "0 (off) or a window of at least 2 images", got="1")
        if tile_size and reference_count:
            raise NodeInputError(node, "tile_size", "0 when reference_count > 0 (windows are a batch-mode option)",
                                 got=str(tile_size))
        sampling = model.get_model_object("model_sampling")
        settings = CSASettings(
            rates=((8, sampling_rate_1_8), (16, sampling_rate_1_16), (32, sampling_rate_1_32)),
            reference_count=reference_count, seed=seed, blocks=BLOCK_CHOICES[blocks],
            sigma_start=float(sampling.percent_to_sigma(start_percent)),
            sigma_end=float(sampling.percent_to_sigma(end_percent)), schedule=schedule, tile_size=tile_size,
            dit_blocks=DIT_BLOCK_CHOICES[dit_blocks], subject_masks=bool(subject_masks))
        return io.NodeOutput(apply_csa(model, settings))


NODES = [ConsistentSelfAttention]
