"""Exception classes shared by the pack. Messages name the node, the input and what was expected."""


class StoryDiffusionError(Exception):
    """Base class of every error this pack raises on purpose."""


class NodeInputError(StoryDiffusionError, ValueError):
    """A node input is unusable.

    ``NodeInputError("SDN_StoryPrompt", "story", "a '[Name] description' line", got="line 3: ...")``
    reads: ``SDN_StoryPrompt: input 'story': expected a '[Name] description' line, got line 3: ...``.
    """

    def __init__(self, node: str, input_name: str, expected: str, got: str | None = None):
        self.node, self.input_name, self.expected, self.got = node, input_name, expected, got
        msg = f"{node}: input '{input_name}': expected {expected}"
        if got is not None:
            msg += f", got {got}"
        super().__init__(msg)


class UnsupportedModelError(StoryDiffusionError, TypeError):
    """The model's architecture has no place for this patch (for example a DiT such as Flux)."""
