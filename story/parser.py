"""Story prompt parser: the StoryDiffusion reference app's prompt syntax, in one text box.

Pure Python (no torch, no ComfyUI). Follows the syntax of the reference app (HVision-NKU/StoryDiffusion,
``gradio_app_sdxl_specific_id_low_vram.py``), which had one box for characters and one for panels; here both
live in one ``story`` text:

* ``[Name] description``: defines a character (character section, see below). ``Name`` may hold spaces
  (``[Old Man]``) but no ``[``, ``]`` or ``#``; names are case-sensitive; ``NC`` is reserved. Any number of
  characters (the reference app allowed at most 2).
* Every other line is one panel. ``[Name]`` inside a panel line is replaced by that character's description.
  A panel may name several characters. ``[NC]`` marks a panel with no character (the marker is removed;
  it cannot be combined with a character).
* Text after the LAST ``#`` of a panel line is the panel's caption, not part of the prompt (earlier ``#``
  stay in the prompt text). In a caption, ``[Name]`` of a known character becomes ``Name``.
* A line starting with ``>`` is a dialogue line of the panel line before it (the one reserved prefix: a panel
  line cannot start with ``>``): ``> Name: text`` (speech), ``> Name (thought): text``, ``> Name (shout): text``,
  ``> Name (whisper): text``, ``> Name (speech): text``; ``> text`` without a colon, or ``> : text``, is narration
  (a caption box). ``Name`` is a character of the story (case-sensitive, ``[Name]`` also accepted); narration
  containing a colon needs the ``> :`` form. In the text, ``[Name]`` of a known character becomes ``Name`` and
  ``#`` is plain text. Dialogue is drawn by SDN_ComicLayout, never encoded.
* Blank lines and lines whose first non-blank characters are ``//`` (comments) are ignored everywhere.

Where the character section ends:

* With a separator: a line of three or more dashes (``---``). Every line before it must be a character
  definition and every line after it is a panel (so panels may start with ``[Name]``, as in the reference
  app). Recommended.
* Without one: the character section is the leading run of ``[Name] description`` lines whose ``Name`` is not
  yet defined; the first other line (for instance ``[Bob] reads a paper`` once Bob is defined, or a line not
  starting with ``[``) is the first panel. A duplicate definition therefore reads as a panel here; use the
  separator to have duplicates reported.

Every malformed story raises :class:`NodeInputError` (node ``SDN_StoryPrompt``, input ``story``) whose message
gives the 1-based line number and what is wrong.
"""
from __future__ import annotations

import difflib
import re
from dataclasses import dataclass, field, replace

from ..errors import NodeInputError

NODE_ID = "SDN_StoryPrompt"
INPUT = "story"
NO_CHARACTER = "NC"

_SEPARATOR = re.compile(r"^-{3,}$")
_LEADING_NAME = re.compile(r"^\[([^\[\]#]*)\]\s*(.*)$")
_BRACKETED = re.compile(r"\[([^\[\]]*)\]")
_DIALOGUE = ">"
_SPEAKER = re.compile(r"^\[?([^\[\]():]*?)\]?\s*(?:\(([^()]*)\))?$")  # "Name", "[Name]", "Name (kind)"
KINDS = ("speech", "thought", "shout", "whisper")
NARRATION = "narration"
_OPEN, _CLOSE = "\ue000", "\ue001"  # private-use marks around inserted descriptions, removed again


@dataclass(frozen=True)
class DialogueLine:
    """One dialogue line of a panel (a ``>`` line of the story).

    speaker: a character name of the story, or None for narration.
    kind: one of ``KINDS`` for a speaker, ``"narration"`` without one.
    text: the text, whitespace collapsed, ``[Name]`` of known characters replaced by ``Name``; never empty.
    line: 1-based line number in the story text.
    """

    speaker: str | None
    kind: str
    text: str
    line: int


@dataclass(frozen=True)
class Panel:
    """One panel of a story.

    index: 0-based position in the story (= position in the latent batch).
    line: 1-based line number in the story text.
    prompt: the panel text with ``[Name]`` replaced by descriptions and ``[NC]`` removed; no style applied.
    caption: text after the last ``#`` (stripped), ``""`` when the line has no ``#``.
    characters: names of the characters the panel names, in order of first appearance, each once.
    no_character: True when the panel carries ``[NC]``.
    source: the raw line.
    mentions: ``(name, start, stop)`` per ``[Name]`` marker, in order: the character range ``prompt[start:stop]``
        holding that character's description (empty when the line itself holds U+E000 or U+E001).
    spans: ``{name: ((start, stop), ...)}``: positions on the token axis (dim 1) of this panel's row of
        SDN_StoryPrompt's ``positive`` cond holding the name's description, one range per contiguous run (a
        description cut by a 77-token CLIP chunk or named twice gives several). Set by SDN_StoryPrompt; empty
        when parsed directly or when the text encoder's layout is unsupported (see story/encode.py).
    dialogue: the panel's dialogue lines (:class:`DialogueLine`) in story order.
    """

    index: int
    line: int
    prompt: str
    caption: str
    characters: tuple[str, ...]
    no_character: bool
    source: str
    mentions: tuple = ()
    spans: dict = field(default_factory=dict)
    dialogue: tuple = ()


@dataclass(frozen=True)
class Story:
    """Parsed story: the payload of the ``SDN_STORY`` type.

    characters: name -> description, in definition order (treat as read-only).
    panels: the panels in story order.
    style: name of the style preset applied by SDN_StoryPrompt (``"none"`` when parsed directly).
    carried: how many of the first panels are reference panels carried in front of a batch (SDN_StoryBatches'
    bank-free reference mode); SDN_MergePanels keeps each of them once.
    """

    characters: dict = field(default_factory=dict)
    panels: tuple = ()
    style: str = "none"
    carried: int = 0

    def __len__(self) -> int:
        return len(self.panels)

    @property
    def character_names(self) -> tuple[str, ...]:
        return tuple(self.characters)

    @property
    def captions(self) -> tuple[str, ...]:
        return tuple(p.caption for p in self.panels)

    def panels_naming(self, name: str) -> tuple[int, ...]:
        """0-based indices of the panels that name character ``name`` (KeyError if it is not defined)."""
        if name not in self.characters:
            raise KeyError(f"no character {name!r} in this story (characters: {', '.join(map(repr, self.characters)) or 'none'})")
        return tuple(p.index for p in self.panels if name in p.characters)

    def styled_prompts(self) -> tuple[str, ...]:
        """Each panel's prompt wrapped by this story's style preset (what SDN_StoryPrompt encodes)."""
        from .styles import apply_style

        return tuple(apply_style(self.style, p.prompt) for p in self.panels)


def _error(line_no: int, what: str, expected: str = "a valid story (see the node's tooltip)") -> NodeInputError:
    return NodeInputError(NODE_ID, INPUT, expected, got=f"line {line_no}: {what}")


def _check_brackets(text: str, line_no: int) -> None:
    depth = 0
    for ch in text:
        if ch == "[":
            depth += 1
            if depth > 1:
                raise _error(line_no, "nested '[' (unbalanced brackets)", "balanced [Name] markers")
        elif ch == "]":
            depth -= 1
            if depth < 0:
                raise _error(line_no, "']' without a matching '['", "balanced [Name] markers")
    if depth:
        raise _error(line_no, "'[' without a matching ']'", "balanced [Name] markers")


def _parse_character(body: str, line_no: int, characters: dict) -> None:
    m = _LEADING_NAME.match(body)
    if m is None:
        _check_brackets(body, line_no)
        raise _error(line_no, f"'{_short(body)}' is not a character definition", "'[Name] description' lines before the '---' separator")
    name, desc = m.group(1).strip(), m.group(2).strip()
    _check_brackets(desc, line_no)
    if not name:
        raise _error(line_no, "empty character name '[]'", "'[Name] description'")
    if name == NO_CHARACTER:
        raise _error(line_no, "'[NC]' is reserved for panels without a character", "a character name other than NC")
    if name in characters:
        raise _error(line_no, f"duplicate character {name!r}", "each character defined once")
    if not desc:
        raise _error(line_no, f"character {name!r} has an empty description", "'[Name] description'")
    if "[" in desc:
        raise _error(line_no, f"description of {name!r} contains a [..] marker", "a plain-text description")
    characters[name] = desc


def _short(text: str, n: int = 40) -> str:
    return text if len(text) <= n else text[: n - 3] + "..."


def _did_you_mean(name: str, characters: dict) -> tuple[str, bool]:
    """A hint naming the character closest to ``name`` (``""`` if none) and whether it differs only in case."""
    folded = {k.casefold(): k for k in characters}
    if name.casefold() in folded:
        return f"; did you mean {folded[name.casefold()]!r}? (names are case-sensitive)", True
    close = difflib.get_close_matches(name, list(characters), n=1)
    return (f"; did you mean {close[0]!r}?" if close else ""), False


def _listing(characters: dict) -> str:
    return ", ".join(map(repr, characters)) or "none"


def _unknown_character(name: str, characters: dict, defines: bool, separated: bool) -> str:
    """What is wrong with ``[name]`` in a panel and how to fix it. Names are shown with repr() so invisible
    characters (zero-width spaces...) show as escapes. ``defines``: the marker starts a line that reads like a
    character definition; ``separated``: the story has a '---' line."""
    hint, case_only = _did_you_mean(name, characters)
    what = f"unknown character {f'[{name}]'!r}; characters are {_listing(characters)}{hint}"
    if defines and not case_only:
        where = ", above the '---' line" if separated else ""
        what += f" (a new character's '[Name] description' line goes before the first panel{where})"
    return what


def _unbracket(text: str, characters: dict) -> str:
    """``text`` with ``[Name]`` of known characters replaced by ``Name`` (captions and dialogue)."""
    return _BRACKETED.sub(lambda m: m.group(1).strip() if m.group(1).strip() in characters else m.group(0), text)


def _parse_dialogue(body: str, line_no: int, characters: dict) -> DialogueLine:
    """One ``>`` line (syntax in the module docstring)."""
    form = "'> Name: text', '> Name (kind): text' with kind one of " + ", ".join(KINDS) + ", or '> text' (narration)"
    rest = body[len(_DIALOGUE):].strip()
    head, colon, text = rest.partition(":")
    if not colon:
        head, text = "", rest
    m = _SPEAKER.match(head.strip())
    if m is None:
        raise _error(line_no, f"'{_short(head.strip())}' is not a speaker", form)
    name, kind = m.group(1).strip(), (m.group(2) or "").strip().lower()
    if not name and kind:
        raise _error(line_no, f"'({kind})' without a speaker", form)
    if name and name not in characters:
        hint = _did_you_mean(name, characters)[0]
        raise _error(line_no, f"unknown speaker {name!r}; characters are {_listing(characters)}{hint} (narration "
                     "with a colon is written '> : text')", "a character of the story as the speaker")
    if name and kind and kind not in KINDS:
        raise _error(line_no, f"unknown dialogue kind {kind!r}", form)
    text = " ".join(_unbracket(text, characters).split())
    if not text:
        raise _error(line_no, "empty dialogue text", form)
    return DialogueLine(speaker=name or None, kind=(kind or "speech") if name else NARRATION, text=text, line=line_no)


def _parse_panel(body: str, line_no: int, index: int, characters: dict, separated: bool) -> Panel:
    text, sep, caption = body.rpartition("#")
    if not sep:
        text, caption = body, ""
    _check_brackets(text, line_no)
    names: list[str] = []
    no_char = False
    for m in _BRACKETED.finditer(text):
        name = m.group(1).strip()
        if name == NO_CHARACTER:
            no_char = True
        elif name in characters:
            if name not in names:
                names.append(name)
        else:
            defines = m.start() == 0 and bool(text[m.end():].strip())
            raise _error(line_no, _unknown_character(name, characters, defines, separated),
                         "a defined character or [NC]")
    if no_char and names:
        raise _error(line_no, f"[NC] together with character(s) {', '.join(map(repr, names))}",
                     "[NC] only on panels without a character")

    mark = _OPEN not in text and _CLOSE not in text
    order: list[str] = []

    def expand(m: re.Match) -> str:
        name = m.group(1).strip()
        if name == NO_CHARACTER:
            return ""
        order.append(name)
        return f"{_OPEN}{characters[name]}{_CLOSE}" if mark else characters[name]

    # descriptions are stripped and non-empty, so the marks never split a whitespace run
    prompt = re.sub(r"\s+", " ", _BRACKETED.sub(expand, text)).strip()
    prompt, mentions = _unmark(prompt, order) if mark else (prompt, ())
    if not prompt:
        raise _error(line_no, "the panel has no prompt text", "a panel description before the '#' caption")
    caption = _unbracket(caption, characters)
    return Panel(index=index, line=line_no, prompt=prompt, caption=caption.strip(), characters=tuple(names),
                 no_character=no_char, source=body, mentions=mentions)


def _unmark(marked: str, names: list[str]) -> tuple[str, tuple]:
    """``marked`` without the description marks, and ``(name, start, stop)`` of each marked range."""
    out, mentions, names = [], [], iter(names)
    length = start = 0
    for piece in re.split(f"([{_OPEN}{_CLOSE}])", marked):
        if piece == _OPEN:
            start = length
        elif piece == _CLOSE:
            mentions.append((next(names), start, length))
        else:
            out.append(piece)
            length += len(piece)
    return "".join(out), tuple(mentions)


def parse_story(text: str) -> Story:
    """Parse a story text (syntax in the module docstring) into a :class:`Story`.

    Raises NodeInputError("SDN_StoryPrompt", "story", ...) with the line number for: a non-definition line
    or duplicate / empty / reserved character before the separator, a second separator, unknown character in
    a panel (including one defined after panels started), ``[NC]`` with a character, unbalanced or nested
    brackets, a panel without prompt text, a story without panels, and dialogue lines that come before any
    panel, name an unknown speaker or kind, or have no text.
    """
    if not isinstance(text, str):
        raise NodeInputError(NODE_ID, INPUT, "a text", got=type(text).__name__)
    lines = [(i + 1, raw.strip()) for i, raw in enumerate(text.splitlines())]
    lines = [(n, s) for n, s in lines if s and not s.startswith("//")]
    sep_lines = [n for n, s in lines if _SEPARATOR.match(s)]
    if len(sep_lines) > 1:
        raise _error(sep_lines[1], "a second '---' separator", "at most one '---' line between characters and panels")

    characters: dict[str, str] = {}
    panels: list[Panel] = []
    in_header = True
    for n, s in lines:
        if s.startswith(_DIALOGUE):
            if not panels:
                raise _error(n, "a dialogue line ('>') before any panel", "dialogue lines after the panel line they belong to")
            panels[-1] = replace(panels[-1], dialogue=panels[-1].dialogue + (_parse_dialogue(s, n, characters),))
        elif sep_lines and n == sep_lines[0]:
            in_header = False
        elif sep_lines and in_header:
            _parse_character(s, n, characters)
        else:
            if in_header and not sep_lines:
                m = _LEADING_NAME.match(s)
                name = m.group(1).strip() if m else None
                if m is not None and name != NO_CHARACTER and name not in characters:
                    _parse_character(s, n, characters)
                    continue
                in_header = False
            panels.append(_parse_panel(s, n, len(panels), characters, bool(sep_lines)))
    if not panels:
        last = max(1, len(text.splitlines()))  # the end of the story
        hint = ""
        if characters and not sep_lines:
            hint = (f" (all {len(characters)} '[Name] ...' lines were read as character definitions; put a '---' "
                    "line between the characters and the panels)")
        raise _error(last, "the story has no panels" + hint, "at least one panel line after the character lines")
    return Story(characters=characters, panels=tuple(panels))
