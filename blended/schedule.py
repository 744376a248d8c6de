"""How hard CLIP pulls at each step, and an optional guard on the guidance gradient.

The original keeps the CLIP weight constant. Disco Diffusion's users often ramp it (strong early to set the
layout, weak late to spare the details, or the reverse) and cap the gradient, a common guard against
blow-ups with high weights. The schedule is a multiplier of ``clip_lambda``; the constant schedule (the
default) multiplies by exactly 1, so default numbers are the original's.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import torch

from .errors import BlendedInputError

SHAPES = ("constant", "linear", "values")
GUARDS = ("off", "clamp", "normalize")
_ONE_COMMA_BETWEEN_DIGITS = re.compile(r"^[+-]?\d+,\d+$")  # '0,5': 0.5 or two values?


@dataclass(frozen=True)
class GuidanceSchedule:
    """``shape``: "constant" (x1 at every step), "linear" (two values: first step -> last step) or "values"
    (any number of values placed evenly from the first to the last step, linearly interpolated between).

    ``guard``: "off", "clamp" (every gradient element clamped to +-``limit``) or "normalize" (each sample's
    gradient scaled down so its RMS is at most ``limit``, as Disco Diffusion's ``clamp_grad``).
    """

    shape: str = "constant"
    values: tuple = ()
    guard: str = "off"
    limit: float = 0.0

    def __post_init__(self):
        if self.shape not in SHAPES:
            raise BlendedInputError(f"unknown schedule shape {self.shape!r}: use one of {', '.join(SHAPES)}.")
        if self.guard not in GUARDS:
            raise BlendedInputError(f"unknown gradient guard {self.guard!r}: use one of {', '.join(GUARDS)}.")
        if self.shape == "linear" and len(self.values) != 2:
            raise BlendedInputError(f"a linear schedule needs exactly two values (first step, last step), got "
                                    f"{len(self.values)}: e.g. '0.2, 1.0'.")
        if self.shape == "values" and not self.values:
            raise BlendedInputError("a 'values' schedule needs at least one value, e.g. '1.0, 0.5, 0.25'.")
        if self.guard != "off" and not (math.isfinite(self.limit) and self.limit > 0):
            raise BlendedInputError(f"the gradient guard {self.guard!r} needs a limit > 0, got {self.limit}.")

    @property
    def is_constant(self) -> bool:
        return self.shape == "constant"

    def factor(self, step: int, num_steps: int) -> float:
        """Multiplier of the CLIP weight at run step ``step`` (0 = first step run) of ``num_steps``."""
        if self.is_constant:
            return 1.0
        values = [float(v) for v in self.values]
        if len(values) == 1 or num_steps <= 1:
            return values[0]
        position = min(max(step, 0), num_steps - 1) / (num_steps - 1) * (len(values) - 1)
        low = min(int(position), len(values) - 2)
        frac = position - low
        return values[low] * (1 - frac) + values[low + 1] * frac

    def guard_gradient(self, grad: torch.Tensor) -> torch.Tensor:
        """The guarded gradient [B,...]; per sample, so a result does not depend on its batch."""
        if self.guard == "clamp":
            return grad.clamp(-self.limit, self.limit)
        if self.guard == "normalize":
            rms = grad.pow(2).mean(dim=tuple(range(1, grad.dim())), keepdim=True).sqrt()
            return grad * (self.limit / rms.clamp(min=1e-30)).clamp(max=1.0)
        return grad



def parse_values(text: str, shape: str = "values") -> tuple:
    """'0.2, 1.0' (commas and/or spaces) -> (0.2, 1.0); a bad entry is quoted in the error.

    The values multiply ``clip_lambda``, so they are >= 0 (a negative weight belongs on a prompt part). Decimal
    commas would split into twice as many numbers, so they are refused rather than guessed at: with semicolons
    between the values ('0,5; 1,5'), and wherever one comma sits between two runs of digits with no other
    separator ('0,5', '0,5 1,5': 0.5, or the values 0 and 5?), unless ``shape`` leaves only one reading: a
    "linear" schedule takes exactly two values, so '1,0' can only be 1 and 0.
    """
    groups = [g for g in re.split(r"[\s;]+", str(text).strip()) if g]
    ambiguous = [g for g in groups if _ONE_COMMA_BETWEEN_DIGITS.match(g)]
    if ambiguous and shape == "linear":
        as_decimals = [e for e in re.split(r"[,\s;]+", re.sub(r"(\d),(\d)", r"\1.\2", str(text)).strip()) if e]
        if len(as_decimals) != 2:  # the decimal reading is not a linear schedule: the commas separate values
            ambiguous = []
    if ambiguous or (";" in str(text) and re.search(r"\d,\d", str(text))):
        which = f" ({ambiguous[0]!r} could be {ambiguous[0].replace(',', '.')} or two values)" if ambiguous else ""
        raise BlendedInputError(f"schedule values {str(text)!r} look like they use decimal commas{which}: write "
                                "decimals with a point and separate the values with spaces or ', ', e.g. "
                                "'0.5, 1.5'.")
    entries = [e for e in re.split(r"[,\s;]+", str(text).strip()) if e]
    values = []
    for entry in entries:
        try:
            value = float(entry)
        except ValueError:
            value = math.nan
        if not math.isfinite(value):
            raise BlendedInputError(f"schedule value {entry!r} in {str(text)!r} is not a number: write numbers "
                                    "separated by commas, e.g. '1.0, 0.5, 0.25'.")
        if abs(value) > torch.finfo(torch.float32).max:  # infinite once in float32: every image would come out NaN
            raise BlendedInputError(f"schedule value {entry!r} in {str(text)!r} is too large: the values scale "
                                    "the CLIP weight, e.g. '1.0, 0.5, 0.25'.")
        if value < 0:
            raise BlendedInputError(f"schedule value {entry!r} in {str(text)!r} is negative: the values multiply "
                                    "clip_lambda and must be >= 0; to steer away from something, give a prompt "
                                    "part a negative weight ('blurry:-0.5').")
        values.append(value)
    return tuple(values)
