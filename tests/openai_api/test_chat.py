"""OpenAI's request as sheaf's, and sheaf's answer as OpenAI's objects, checked against the
`openai` package's own types."""

from typing import Any

import pytest
from openai.types import Completion
from openai.types.chat import ChatCompletion, ChatCompletionChunk

from sheaf.openai_api.chat import ChatCompletionRequest, CompletionRequest, Replies
from sheaf.openai_api.errors import OpenAIError

ANSWER: dict[str, Any] = {
    "request_id": "chatcmpl-1",
    "text": "a fox",
    "finish_reason": "length",
    "prompt_tokens": 5,
    "completion_tokens": 2,
    "metadata": {"batch_size": 3},
}


def test_a_chat_request_maps_onto_sheafs_fields() -> None:
    request = ChatCompletionRequest.parse(
        {
            "model": "textgen",
            "messages": [
                {"role": "developer", "content": "be brief"},
                {"role": "user", "content": [{"type": "text", "text": "a "}, {"type": "text", "text": "fox"}]},
            ],
            "max_tokens": 5,
            "max_completion_tokens": 7,
            "stop": "\n",
            "seed": 1,
        }
    ).to_sheaf("chatcmpl-1")
    assert [m.model_dump() for m in request.messages] == [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "a fox"},
    ]
    assert (request.max_new_tokens, request.stop, request.seed, request.temperature) == (7, ["\n"], 1, 1.0)
    assert request.request_id == "chatcmpl-1"


def test_a_completion_takes_one_prompt() -> None:
    assert CompletionRequest.parse({"model": "m", "prompt": ["once"]}).to_sheaf("c").prompt == "once"
    with pytest.raises(OpenAIError) as raised:
        CompletionRequest.parse({"model": "m", "prompt": ["a", "b"]}).to_sheaf("c")
    assert raised.value.param == "prompt"
    with pytest.raises(OpenAIError) as raised:
        CompletionRequest.parse({"model": "m", "prompt": "a", "echo": True}).to_sheaf("c")
    assert raised.value.param == "echo"


def test_whole_answers_are_openais_objects() -> None:
    chat = ChatCompletion.model_validate(Replies(True, "chatcmpl-1", "textgen", 1).whole(ANSWER))
    assert chat.choices[0].message.content == "a fox" and chat.choices[0].finish_reason == "length"
    assert chat.usage is not None and chat.usage.total_tokens == 7
    assert (chat.model_extra or {})["sheaf"]["batch_size"] == 3
    text = Completion.model_validate(Replies(False, "cmpl-1", "textgen", 1).whole(ANSWER))
    assert text.choices[0].text == "a fox"


def test_stream_chunks_are_openais_chunks() -> None:
    replies = Replies(True, "chatcmpl-1", "textgen", 1, include_usage=True)
    first = replies.first()
    assert first is not None
    payloads = [first, replies.chunk("a"), replies.chunk(" fox"), *replies.last(ANSWER)]
    chunks = [ChatCompletionChunk.model_validate(payload) for payload in payloads]
    assert chunks[0].choices[0].delta.role == "assistant"
    assert [c.choices[0].delta.content for c in chunks[1:3]] == ["a", " fox"]
    assert chunks[3].choices[0].finish_reason == "length" and chunks[3].usage is None
    assert chunks[4].choices == [] and chunks[4].usage is not None and chunks[4].usage.completion_tokens == 2
    plain = Replies(False, "cmpl-1", "textgen", 1)
    assert plain.first() is None
    # OpenAI's completion chunks say `finish_reason: null` until the last, though the type has no null.
    assert plain.chunk("a")["choices"] == [{"index": 0, "finish_reason": None, "logprobs": None, "text": "a"}]
    assert Completion.model_validate(plain.last(ANSWER)[0]).choices[0].finish_reason == "length"
