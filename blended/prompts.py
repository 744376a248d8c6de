"""Weighted and negative prompts: ``a red rock:1.0 | moss:0.5 | blurry:-0.5``.

One line of the prompt box is one prompt (one set of results). Within a line, ``|`` separates parts; a part
may end in ``:weight``. The CLIP loss of the line is the weighted sum of each part's spherical distance, so a
negative weight pushes the edit away from that text. A line without ``|`` or ``:weight`` is one part of
weight 1: exactly the original's single prompt.

A trailing ``:<token>`` counts as a weight when the token (no spaces) starts like a number (a digit, a sign, a
dot, or a comma before a digit), is ``nan``/``inf`` or is empty; it must then be a finite number, otherwise the
part is refused with a message quoting it. Any other colon stays text ("style: watercolor"). ``\\:`` and ``\\|``
write a literal colon or bar. A part ending in a digit, a colon and a whole number with no space around the
colon ("a photo 16:9", "12:30:45", "R2D2:2") is refused as ambiguous (an aspect ratio or a time read as a weight
would scale that part silently): ``16\\:9`` keeps it text, a space before the colon ("R2D2 :2") makes it a
weight.

Lines and parts that hold only invisible characters (spaces, a byte-order mark, zero-width or control
characters, as text pasted from a file may carry) count as empty.
"""

from __future__ import annotations

import math
import re
import unicodedata
from dataclasses import dataclass

import torch

from .errors import BlendedInputError

_ESCAPES = {"\\|": "\x00", "\\:": "\x01"}
_WEIGHT = re.compile(r"^(?P<text>.*):\s*(?P<weight>\S*)\s*$", re.DOTALL)
_LOOKS_NUMERIC = re.compile(r"^(?:[-+.\d]|,\d|[-+]?(?:nan|inf(?:inity)?)$)", re.IGNORECASE)
# A digit, a colon and whole-number digits ending a part, with no space around the colon: an aspect ratio or a
# time ('16:9', '12:30:45'), or the weight of a text ending in a number? (An escaped colon is the placeholder.)
_AMBIGUOUS_END = re.compile(r"\d:\d+$")
SYNTAX_HINT = "write parts as 'text:weight' separated by '|', e.g. 'a red rock:1.0 | moss:0.5 | blurry:-0.5'"


@dataclass(frozen=True)
class PromptPart:
    text: str
    weight: float = 1.0


@dataclass(frozen=True)
class WeightedPrompt:
    """One prompt line: its parts and the line as the user wrote it (named in the results)."""

    parts: tuple
    source: str

    @property
    def is_empty(self) -> bool:
        return not self.parts

    def __str__(self) -> str:
        return self.source


def is_blank(text: str) -> bool:
    """Nothing visible: whitespace, format characters (byte-order mark, zero-width space) or control characters."""
    return all(ch.isspace() or unicodedata.category(ch) in ("Cc", "Cf") for ch in text)


def _unescape(text: str) -> str:
    return text.replace("\x00", "|").replace("\x01", ":")


def _as_typed(escaped: str) -> str:
    """Text with placeholders as the user would type it, escapes included: for suggestions that parse."""
    return escaped.replace("\x00", "\\|").replace("\x01", "\\:")


def _ambiguity_message(part: str, text: str, weight: str) -> str:
    """What to write instead of a part ending like '16:9' (``part`` and ``text`` still hold the placeholders)."""
    shown = _unescape(part)
    as_text = _as_typed(part.replace(":", "\x01"))  # every colon literal: one part of weight 1
    as_weight = f"{_as_typed(text.strip())} :{weight}"
    return (f"the prompt part {shown!r} is ambiguous: it ends in a number, a colon and a whole number, which reads as "
            f"the weight {weight} of {_unescape(text.strip())!r}. If it is text (an aspect ratio, a time), escape "
            f"its colons: '{as_text}'; if {weight} is the weight, put a space before the colon: '{as_weight}'.")


def parse_prompt(line: str) -> WeightedPrompt:
    """Parse one prompt line. An empty line is the empty prompt (no text guidance)."""
    source = str(line).strip()
    if is_blank(source):
        return WeightedPrompt((), "")
    escaped = source
    for escape, placeholder in _ESCAPES.items():
        escaped = escaped.replace(escape, placeholder)
    raw_parts = escaped.split("|")
    parts = []
    for raw in raw_parts:
        shown = _unescape(raw).strip()
        text, weight = raw.strip(), 1.0
        match = _WEIGHT.match(text)
        if match and (match["weight"] == "" or _LOOKS_NUMERIC.match(match["weight"])):
            try:
                weight = float(match["weight"])
            except ValueError:
                weight = math.nan
            if not math.isfinite(weight):
                comma = " with a decimal point, not a comma" if "," in match["weight"] else ""
                raise BlendedInputError(
                    f"malformed weight in the prompt part {shown!r}: {match['weight']!r} is not a number; "
                    f"{SYNTAX_HINT}{comma} (write '\\:' for a literal colon).")
            if _AMBIGUOUS_END.search(text):
                raise BlendedInputError(_ambiguity_message(text, match["text"], match["weight"]))
            if abs(weight) > torch.finfo(torch.float32).max:  # infinite once in float32: every image would come out NaN
                raise BlendedInputError(f"the weight of the prompt part {shown!r} is too large ({match['weight']}); "
                                        "weights are relative, e.g. 1.0 and 0.5.")
            text = match["text"].strip()
        text = _unescape(text)
        if is_blank(text):
            if len(raw_parts) == 1 and not match:
                return WeightedPrompt((), "")
            raise BlendedInputError(f"empty part {shown!r} in the prompt {source!r}: every part between '|' "
                                    f"needs text; {SYNTAX_HINT}.")
        parts.append(PromptPart(text, weight))
    return WeightedPrompt(tuple(parts), source)


def parse_prompt_lines(text: str) -> list[WeightedPrompt]:
    """One weighted prompt per non-empty line; [the empty prompt] when there is none (no text guidance)."""
    lines = [line for line in str(text).splitlines() if not is_blank(line)]
    return [parse_prompt(line) for line in lines] or [WeightedPrompt((), "")]


def as_weighted(prompt) -> WeightedPrompt:
    """A plain string is taken literally, as one part of weight 1 (no parsing): the original's behaviour."""
    if isinstance(prompt, WeightedPrompt):
        return prompt
    if isinstance(prompt, str):
        return WeightedPrompt((PromptPart(prompt, 1.0),) if prompt != "" else (), prompt)
    raise BlendedInputError(f"a prompt must be text or a parsed weighted prompt, not {type(prompt).__name__}.")
