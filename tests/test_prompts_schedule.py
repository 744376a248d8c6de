"""The weighted-prompt syntax and the guidance schedule, on their own (no model needed)."""

from __future__ import annotations

import re

import pytest
import torch

from blended.errors import BlendedInputError
from blended.prompts import PromptPart, as_weighted, parse_prompt, parse_prompt_lines
from blended.schedule import GuidanceSchedule, parse_values


def parts(line):
    return [(p.text, p.weight) for p in parse_prompt(line).parts]


def test_a_plain_prompt_is_one_part_of_weight_one():
    assert parts("a red rock") == [("a red rock", 1.0)]
    assert parse_prompt("  a red rock ").source == "a red rock"
    assert as_weighted("a red rock").parts == (PromptPart("a red rock", 1.0),)
    assert parse_prompt("").is_empty and as_weighted("").is_empty


def test_weighted_and_negative_parts():
    assert parts("a red rock:1.0 | moss:0.5 | blurry:-0.5") == [("a red rock", 1.0), ("moss", 0.5),
                                                               ("blurry", -0.5)]
    assert parts("moss: 2 | sky:+.5 | fog:1e-1") == [("moss", 2.0), ("sky", 0.5), ("fog", 0.1)]


def test_colons_that_are_not_weights_stay_text():
    assert parts("style: watercolor") == [("style: watercolor", 1.0)]
    assert parts("a 3:4 photo of a cat") == [("a 3:4 photo of a cat", 1.0)]
    assert parts(r"ratio 3\:4 | a bar \| pipe:2") == [("ratio 3:4", 1.0), ("a bar | pipe", 2.0)]


@pytest.mark.parametrize("line, quoted", [("a red rock:1.0 | moss:0.5x", "moss:0.5x"), ("moss:", "moss:"),
                                          ("rock:1..0", "rock:1..0"), ("rock:-", "rock:-"),
                                          ("rock:1e999", "rock:1e999")])
def test_malformed_weight_is_refused_quoting_the_part(line, quoted):
    with pytest.raises(BlendedInputError, match="malformed weight") as err:
        parse_prompt(line)
    assert repr(quoted) in str(err.value) and "text:weight" in str(err.value)


@pytest.mark.parametrize("line", ["a red rock | | moss", "| moss", "moss |", ":0.5 | moss"])
def test_empty_part_is_refused(line):
    with pytest.raises(BlendedInputError, match="empty part"):
        parse_prompt(line)


def test_lines_stay_separate_prompts():
    lines = parse_prompt_lines("a red rock | blurry:-1\n\n  a blue sky  \n")
    assert [p.source for p in lines] == ["a red rock | blurry:-1", "a blue sky"]
    assert [len(p.parts) for p in lines] == [2, 1]
    assert [p.is_empty for p in parse_prompt_lines(" \n")] == [True]


def test_schedule_factors():
    assert GuidanceSchedule().factor(3, 10) == 1.0
    ramp = GuidanceSchedule("linear", (0.2, 1.0))
    assert [round(ramp.factor(i, 5), 6) for i in range(5)] == [0.2, 0.4, 0.6, 0.8, 1.0]
    listed = GuidanceSchedule("values", (1.0, 0.0, 2.0))
    assert [listed.factor(i, 5) for i in range(5)] == [1.0, 0.5, 0.0, 1.0, 2.0]
    assert GuidanceSchedule("values", (0.7,)).factor(4, 9) == 0.7
    assert ramp.factor(0, 1) == 0.2


def test_schedule_refuses_bad_settings_with_what_to_do():
    with pytest.raises(BlendedInputError, match="two values"):
        GuidanceSchedule("linear", (1.0,))
    with pytest.raises(BlendedInputError, match="at least one"):
        GuidanceSchedule("values", ())
    with pytest.raises(BlendedInputError, match="limit > 0"):
        GuidanceSchedule(guard="clamp", limit=0.0)
    with pytest.raises(BlendedInputError, match="'x'"):
        parse_values("1.0, x")
    assert parse_values(" 1, 0.5;0.25 ") == (1.0, 0.5, 0.25)


def test_gradient_guards():
    grad = torch.tensor([[3.0, -4.0], [0.01, 0.0]]).view(2, 2, 1, 1)
    assert torch.equal(GuidanceSchedule().guard_gradient(grad), grad)
    clamped = GuidanceSchedule(guard="clamp", limit=1.0).guard_gradient(grad)
    assert torch.equal(clamped.flatten(), torch.tensor([1.0, -1.0, 0.01, 0.0]))
    normalized = GuidanceSchedule(guard="normalize", limit=1.0).guard_gradient(grad)
    rms = normalized.pow(2).mean(dim=(1, 2, 3)).sqrt()
    torch.testing.assert_close(rms[0], torch.tensor(1.0))        # capped: direction kept, RMS = limit
    torch.testing.assert_close(normalized[0], grad[0] / grad[0].pow(2).mean().sqrt())
    assert torch.equal(normalized[1], grad[1])                     # under the limit: untouched


def test_a_part_ending_in_a_ratio_or_a_time_is_ambiguous_unless_written_out():
    for line in ("a photo 16:9", "moss | 12:30", "R2D2:2", "a clock at 12:30:45", "at 12:30:00", "ratio:16:9",
                 "a photo 16:9:1"):
        with pytest.raises(BlendedInputError, match="is ambiguous: it ends in a number, a colon and a whole number"):
            parse_prompt(line)
    assert parts(r"a photo 16\:9") == [("a photo 16:9", 1.0)]
    assert parts(r"a photo 16\:9 :1") == parts("a photo 16:9 :1") == [("a photo 16:9", 1.0)]
    with pytest.raises(BlendedInputError, match="ambiguous"):  # '9:1' could be a ratio still
        parse_prompt(r"a photo 16\:9:1")
    assert parts("1984 :2 | 1984: 2 | rock2:1.5 | ratio 16:9 photo | 16:0.5") == [
        ("1984", 2.0), ("1984", 2.0), ("rock2", 1.5), ("ratio 16:9 photo", 1.0), ("16", 0.5)]


@pytest.mark.parametrize("line,meant", [
    ("a clock at 12:30:45", ("a clock at 12:30:45", 1.0)), (r"time\: 12:30", ("time: 12:30", 1.0)),
    ("ratio:16:9", ("ratio:16:9", 1.0)), ("R2D2:2 | moss", ("R2D2:2", 1.0))])
def test_the_ambiguity_errors_suggestions_parse_as_they_say(line, meant):
    """Both suggestions, copied from the message as typed, give the text (weight 1) or the weight asked for."""
    with pytest.raises(BlendedInputError) as err:
        parse_prompt(line)
    as_text, as_weight = re.findall(r"colons: '(.*?)'; if .* the colon: '(.*?)'\.$", str(err.value))[0]
    assert parts(as_text) == [meant]
    text, _, weight = meant[0].rpartition(":")
    assert parts(as_weight) == [(text, float(weight))]


@pytest.mark.parametrize("line", ["rock:nan", "rock:Inf", "rock:-infinity", "rock:,5"])
def test_nan_inf_and_decimal_comma_weights_are_refused_not_read_as_text(line):
    with pytest.raises(BlendedInputError, match="malformed weight"):
        parse_prompt(line)
    assert parts("grandma:nana | style:, watercolor") == [("grandma:nana", 1.0), ("style:, watercolor", 1.0)]


def test_invisible_lines_and_parts_are_empty():
    lines = parse_prompt_lines("\ufeff\na red rock\r\n\u200b\r\n\x00\n\u3000")
    assert [p.source for p in lines] == ["a red rock"]
    assert parse_prompt("\ufeff").is_empty
    with pytest.raises(BlendedInputError, match="empty part"):
        parse_prompt("rock | \u200b:0.5")


@pytest.mark.parametrize("text", ["0,5", "0,5 1,5", "-1,5", "1,5;0,2"])
def test_schedule_values_with_a_decimal_comma_are_refused(text):
    with pytest.raises(BlendedInputError, match="decimal commas"):
        parse_values(text)
    assert parse_values("1,2,3") == (1.0, 2.0, 3.0) and parse_values("1,0.5") == (1.0, 0.5)


def test_a_linear_schedule_reads_one_comma_as_its_two_values_where_decimals_would_not_make_two():
    """A linear schedule takes exactly two values: '1,0' read with a decimal comma would be one value, so it is
    the ramp from 1 to 0 (as workflows saved before the decimal-comma check have it); '0,5 1,5' stays refused,
    since its decimal reading is two values too."""
    assert parse_values("1,0", "linear") == (1.0, 0.0) and parse_values("10,20", "linear") == (10.0, 20.0)
    with pytest.raises(BlendedInputError, match="decimal commas"):
        parse_values("1,0", "values")
    with pytest.raises(BlendedInputError, match="decimal commas"):
        parse_values("0,5 1,5", "linear")


def test_guidance_weights_must_be_numbers_and_not_negative():
    from blended.augment import MAX_VIEWS, AugmentationSettings
    from blended.guidance import GuidanceSettings
    from blended.targets import GuidanceClip

    GuidanceSettings().validate()
    for name, value, message in [("clip_lambda", float("nan"), "clip_lambda is NaN"),
                                 ("range_lambda", -1.0, "range_lambda must be >= 0"),
                                 ("background_lpips_lambda", 1e39, "too large")]:
        with pytest.raises(BlendedInputError, match=message):
            GuidanceSettings(**{name: value}).validate()
    with pytest.raises(BlendedInputError, match="ensemble weight is NaN"):
        GuidanceClip(None, float("nan"))
    AugmentationSettings(num_views=MAX_VIEWS).validate()
    with pytest.raises(BlendedInputError, match=f"at most {MAX_VIEWS}"):
        AugmentationSettings(num_views=MAX_VIEWS + 1).validate()
