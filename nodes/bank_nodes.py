"""Character banks: record a character while its reference panels are sampled, then draw any number of
panels against it (StoryDiffusion's reference-app write/read protocol), save and load characters."""
from pathlib import Path

from comfy_api.latest import io

from ..attention.bank import DTYPES, BankFileError, BankRecorder, CharacterBank, model_fingerprint
from ..attention.patch import BankReader, apply_reading, apply_recording, csa_settings_of
from ..errors import NodeInputError
from .folders import model_folder
from .types import BANK, BANK_RECORDER, STORY

FOLDER = "sdn_characters"


def _register_folder():
    model_folder(FOLDER, {".safetensors"})


class RecordCharacterBank(io.ComfyNode):
    """Write phase: a MODEL that records a character bank while the reference panels are sampled."""

    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="SDN_RecordCharacterBank", display_name="Record Character Bank (StoryDiffusion)",
            category="StoryDiffusion/characters", description=cls.__doc__,
            inputs=[
                io.Model.Input("model", tooltip=(
                    "A model patched by Consistent Self-Attention: the reference panels share among themselves "
                    "with its settings, and its sampled tokens are what the bank keeps.")),
                io.Combo.Input("storage_dtype", options=list(DTYPES), default="fp8", tooltip=(
                    "Precision the bank is stored in: fp8 (e4m3 with one scale per token, half the size of fp16; "
                    "its effect on the panels is a small part of what another token draw changes), fp16 (the "
                    "reference app's), bf16, or fp32 (exact).")),
                io.Combo.Input("storage_device", options=["cpu", "compute device"], default="cpu", tooltip=(
                    "Where the bank lives: CPU memory (moved to the GPU one step at a time while reading), or "
                    "the compute device (faster, costs GPU memory).")),
                io.Float.Input("max_size_gb", default=8.0, min=0.0, max=10000.0, step=0.5, optional=True, tooltip=(
                    "Refuse to record when the bank's size, estimated when sampling starts (before anything is "
                    "stored), exceeds this many GB (10^9 bytes). 0 = no limit. A Flux bank at 1024 px holds tens of "
                    "GB: use bank-free reference mode there.")),
            ],
            outputs=[io.Model.Output("recording_model", display_name="recording model",
                                     tooltip="Sample the reference panels with this model."),
                     BANK_RECORDER.Output("recorder", display_name="recorder", tooltip="Connect to Character Bank together with the samples.")])

    @classmethod
    def execute(cls, model, storage_dtype, storage_device, max_size_gb=8.0):
        settings = csa_settings_of(model)
        if settings is None:
            raise NodeInputError("SDN_RecordCharacterBank", "model",
                                 "a model patched by SDN_ConsistentSelfAttention (connect it first)")
        rec = BankRecorder(storage_dtype=DTYPES[storage_dtype],
                           storage_device="cpu" if storage_device == "cpu" else "compute",
                           fingerprint=model_fingerprint(model), settings=settings.as_dict(),
                           max_bytes=int(max_size_gb * 1e9))
        return io.NodeOutput(apply_recording(model, rec), rec)


class CharacterBankNode(io.ComfyNode):
    """Finish a recording: after the reference KSampler ran, freeze what it recorded into a character bank."""

    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="SDN_CharacterBank", display_name="Character Bank (StoryDiffusion)",
            category="StoryDiffusion/characters", description=cls.__doc__,
            inputs=[
                BANK_RECORDER.Input("recorder", tooltip="From Record Character Bank."),
                io.Latent.Input("samples", tooltip=(
                    "The reference KSampler's output. Connecting it makes the bank wait for that sampling.")),
                io.String.Input("name", default="", tooltip=(
                    "Character name. With a story connected it must be one of its characters; the panels that "
                    "name it will read this bank.")),
                io.String.Input("description", default="", multiline=True, optional=True,
                                tooltip="Saved with the bank. Empty: taken from the story."),
                STORY.Input("story", optional=True, tooltip="The story, to check the name and fill the description."),
            ],
            outputs=[BANK.Output("bank", display_name="bank"),
                     io.String.Output("info", display_name="info", tooltip="What the bank holds and its size.")])

    @classmethod
    def execute(cls, recorder, samples, name, description="", story=None):
        node = "SDN_CharacterBank"
        name = name.strip()
        if not name:
            raise NodeInputError(node, "name", "the character's name")
        if story is not None:
            if name not in story.characters:
                raise NodeInputError(node, "name", f"one of the story's characters {list(story.characters)}",
                                     got=repr(name))
            description = description or story.characters[name]
        if recorder.subject is not None and name != recorder.subject:
            raise NodeInputError(node, "name", f"{recorder.subject!r}, the character the reference panels name (the "
                                 "bank was recorded with subject masks: its tokens carry that character's regions)",
                                 got=repr(name))
        if not recorder.entries:
            raise NodeInputError(node, "samples", (
                "samples drawn with the recording model of SDN_RecordCharacterBank (nothing was recorded: "
                "was that model connected to the KSampler, with CSA active?)"))
        bank = CharacterBank.from_recorder(recorder, name, description or "")
        expected = samples["samples"].shape[0]
        if bank.reference_count != expected:
            raise NodeInputError(node, "samples", f"the reference batch that was recorded ({bank.reference_count} "
                                 "images)", got=f"{expected} images")
        return io.NodeOutput(bank, f"{bank.summary()}; estimated {recorder.estimate / 2**20:.1f} MiB when sampling "
                                   f"started")


class SaveCharacterBank(io.ComfyNode):
    """Save a character bank (with name, description and recording settings) to models/sdn_characters."""

    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="SDN_SaveCharacterBank", display_name="Save Character Bank (StoryDiffusion)",
            category="StoryDiffusion/characters", description=cls.__doc__, is_output_node=True,
            inputs=[BANK.Input("bank"),
                    io.String.Input("file_name", default="", tooltip=(
                        "File name without extension (empty: the character's name). An existing file is never "
                        "overwritten: a number is appended."))],
            outputs=[io.String.Output("path", display_name="path", tooltip="The written file.")])

    @classmethod
    def execute(cls, bank, file_name):
        import folder_paths

        _register_folder()
        stem = "".join(ch for ch in (file_name.strip() or bank.name) if ch.isalnum() or ch in " _-.").strip() or "character"
        folder = Path(folder_paths.get_folder_paths(FOLDER)[0])
        path, n = folder / f"{stem}.safetensors", 1
        while True:
            try:
                bank.save(path)  # never replaces a file: the next free number is taken
                break
            except FileExistsError:
                path, n = folder / f"{stem}_{n:03d}.safetensors", n + 1
        return io.NodeOutput(str(path), ui={"text": [f"saved {bank.summary()} to {path}"]})


class LoadCharacterBank(io.ComfyNode):
    """Load a character bank saved by Save Character Bank, to draw the same character in another story."""

    @classmethod
    def define_schema(cls):
        import folder_paths

        _register_folder()
        return io.Schema(
            node_id="SDN_LoadCharacterBank", display_name="Load Character Bank (StoryDiffusion)",
            category="StoryDiffusion/characters", description=cls.__doc__,
            inputs=[io.Combo.Input("bank_name", options=folder_paths.get_filename_list(FOLDER),
                                   tooltip="A .safetensors file in models/sdn_characters.")],
            outputs=[BANK.Output("bank", display_name="bank"), io.String.Output("info", display_name="info")])

    @classmethod
    def execute(cls, bank_name):
        import folder_paths

        _register_folder()
        path = folder_paths.get_full_path(FOLDER, bank_name)
        if path is None:
            raise NodeInputError("SDN_LoadCharacterBank", "bank_name", "a file in models/sdn_characters",
                                 got=repr(bank_name))
        try:
            bank = CharacterBank.load(path)
        except BankFileError as e:
            raise NodeInputError("SDN_LoadCharacterBank", "bank_name", "a character bank file", got=str(e)) from e
        return io.NodeOutput(bank, bank.summary())


class ReadCharacterBanks(io.ComfyNode):
    """Read phase: a MODEL whose panels attend to their own tokens plus the recorded character banks."""

    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="SDN_ReadCharacterBanks", display_name="Read Character Banks (StoryDiffusion)",
            category="StoryDiffusion/characters", description=cls.__doc__,
            inputs=[
                io.Model.Input("model", tooltip=(
                    "The same checkpoint (and LoRAs) the banks were recorded with. If it is patched by "
                    "Consistent Self-Attention, share_within_batch uses those settings.")),
                BANK.Input("bank", tooltip="A character bank (Character Bank or Load Character Bank)."),
                BANK.Input("bank_2", optional=True, tooltip="Another character's bank."),
                BANK.Input("bank_3", optional=True),
                BANK.Input("bank_4", optional=True),
                STORY.Input("story", optional=True, tooltip=(
                    "The panels of this batch (image i = panel i). Each panel reads the banks of the characters it "
                    "names; [NC] panels read none. Without a story, every image reads every bank.")),
                io.Boolean.Input("share_within_batch", default=False, tooltip=(
                    "Panels of one batch also share among themselves with Consistent Self-Attention "
                    "(needs a CSA-patched model).")),
                io.Boolean.Input("subject_masks", default=False, optional=True, tooltip=(
                    "Read only the character: a panel's tokens inside a character's region attend to that "
                    "character's bank tokens that lay inside its region in the reference panels (and, sharing, to "
                    "the batch's tokens inside its regions); a two-character panel keeps the characters apart, "
                    "its background reads no bank. Needs the model from Character Masks (story = these panels) "
                    "and banks recorded with subject masks. Also on when the model's Consistent Self-Attention "
                    "has subject_masks on.")),
            ],
            outputs=[io.Model.Output(display_name="bank-reading model", tooltip="Sample the panels with this model (same steps, scheduler and size as "
                                             "the recording).")])

    @classmethod
    def execute(cls, model, bank, share_within_batch, bank_2=None, bank_3=None, bank_4=None, story=None,
                subject_masks=False):
        node = "SDN_ReadCharacterBanks"
        connected = [(label, b) for label, b in zip(("bank", "bank_2", "bank_3", "bank_4"),
                                                     (bank, bank_2, bank_3, bank_4)) if b is not None]
        first_with = {}
        for label, b in connected:
            if b.name in first_with:
                raise NodeInputError(node, label, "banks of different characters",
                                     got=f"'{first_with[b.name]}' and '{label}' both hold {b.name!r}")
            first_with[b.name] = label
        fingerprint = model_fingerprint(model)
        for label, b in connected:
            if b.fingerprint != fingerprint:
                raise NodeInputError(node, label, (
                    f"a bank recorded with this model (checkpoint and LoRAs); {b.name!r} was recorded with "
                    "another one"))
        banks = tuple(b for _, b in connected)
        names = [b.name for b in banks]
        if share_within_batch and csa_settings_of(model) is None:
            raise NodeInputError(node, "share_within_batch", "a model patched by SDN_ConsistentSelfAttention "
                                 "when panels share within the batch")
        routing = None
        if story is not None:
            routing = []
            for panel in story.panels:
                missing = [c for c in panel.characters if c not in names]
                if missing:
                    raise NodeInputError(node, "story", f"a connected bank for every character the panels name "
                                         f"(connected: {names})", got=f"story line {panel.line} names {missing}")
                routing.append(tuple(names.index(c) for c in panel.characters))
            routing = tuple(routing)
        return io.NodeOutput(apply_reading(model, BankReader(banks, routing, share_within_batch, subject_masks)))


NODES = [RecordCharacterBank, CharacterBankNode, SaveCharacterBank, LoadCharacterBank, ReadCharacterBanks]
