"""OpenAI's transcription formats from sheaf's answer."""

from typing import Any

from starlette.datastructures import FormData

from sheaf.openai_api.audio import AudioForm, formatted

SEGMENTS = [
    {"id": 0, "start": 0.0, "end": 2.5, "text": " Hello there.", "avg_logprob": -0.2, "no_speech_prob": 0.01,
     "words": [{"word": " Hello", "start": 0.0, "end": 0.6, "probability": 0.9},
               {"word": " there.", "start": 0.7, "end": 1.2, "probability": 0.8}]},
    {"id": 1, "start": 3661.25, "end": 3662.0, "text": " Bye.", "avg_logprob": -0.3, "no_speech_prob": 0.02,
     "words": None},
]  # fmt: skip
ANSWER: dict[str, Any] = {"text": "Hello there. Bye.", "language": "en", "duration": 3662.0, "segments": SEGMENTS}


def form(**fields: str | list[str]) -> AudioForm:
    items = [(k, v) for k, value in fields.items() for v in (value if isinstance(value, list) else [value])]
    return AudioForm.parse(FormData([("model", "whisper"), *items]))


def test_srt_numbers_cues_from_one_with_comma_milliseconds() -> None:
    text, media_type = formatted(ANSWER, form(response_format="srt"), "transcribe")
    assert media_type == "text/plain"
    assert text == "1\n00:00:00,000 --> 00:00:02,500\nHello there.\n\n2\n01:01:01,250 --> 01:01:02,000\nBye.\n"


def test_vtt_has_its_header_and_dot_milliseconds() -> None:
    text, media_type = formatted(ANSWER, form(response_format="vtt"), "transcribe")
    assert media_type == "text/vtt"
    assert text == "WEBVTT\n\n00:00:00.000 --> 00:00:02.500\nHello there.\n\n01:01:01.250 --> 01:01:02.000\nBye.\n"


def test_verbose_json_has_words_only_when_asked() -> None:
    verbose, _ = formatted(ANSWER, form(response_format="verbose_json"), "translate")
    assert isinstance(verbose, dict) and "words" not in verbose
    assert verbose["task"] == "translate" and [s["id"] for s in verbose["segments"]] == [0, 1]
    assert verbose["segments"][1]["seek"] == 366125
    worded, _ = formatted(ANSWER, form(response_format="verbose_json", **{"timestamp_granularities[]": ["word"]}), "")
    assert isinstance(worded, dict) and "segments" not in worded
    assert worded["words"] == [
        {"word": " Hello", "start": 0.0, "end": 0.6},
        {"word": " there.", "start": 0.7, "end": 1.2},
    ]


def test_plain_json_is_the_text_with_its_duration() -> None:
    assert formatted(ANSWER, form(), "transcribe") == (
        {"text": "Hello there. Bye.", "usage": {"type": "duration", "seconds": 3662.0}},
        "application/json",
    )
