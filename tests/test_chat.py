"""af3.chat: the hand-written chat template against the checkpoint's jinja template."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from af3.chat import (
    DEFAULT_SYSTEM_PROMPT,
    conversation_audio,
    is_conversation,
    render_conversation,
)

AUDIO = np.zeros(16000, dtype=np.float32)

CONVERSATIONS = {
    "text_only": [{"role": "user", "content": "What is the capital of France?"}],
    "text_items": [{"role": "user", "content": [{"type": "text", "text": "Hello "},
                                                {"type": "text", "text": "there."}]}],
    "audio_only": [{"role": "user", "content": [{"type": "audio", "path": "a.wav"}]}],
    "audio_text": [{"role": "user", "content": [{"type": "text", "text": "Transcribe the input speech."},
                                                {"type": "audio", "audio": AUDIO}]}],
    "text_then_audio_url": [{"role": "user", "content": [{"type": "audio", "url": "https://x/a.wav"},
                                                         {"type": "text", "text": "What is this?"}]}],
    "multi_turn": [
        {"role": "user", "content": [{"type": "audio", "path": "a.wav"},
                                     {"type": "text", "text": "What instrument is playing?"}]},
        {"role": "assistant", "content": "A violin."},
        {"role": "user", "content": "Is it played solo?"},
        {"role": "assistant", "content": [{"type": "text", "text": "Yes, solo."}]},
        {"role": "user", "content": [{"type": "text", "text": "And this one?"},
                                     {"type": "audio", "path": "b.wav"}]},
    ],
    "system_string": [{"role": "system", "content": "Answer the questions."},
                      {"role": "user", "content": [{"type": "audio", "path": "a.wav"},
                                                   {"type": "text", "text": "Describe it."}]}],
    "system_items": [{"role": "system", "content": [{"type": "text", "text": "Be brief. "},
                                                    {"type": "text", "text": "Use English."}]},
                     {"role": "user", "content": "Hi"}],
    "empty_strings": [{"role": "user", "content": ""}, {"role": "assistant", "content": []}],
    "unicode": [{"role": "user", "content": "Grüße 你好 🎵\n\ttabs\r\nCRLF"}],
}


@pytest.fixture(scope="module")
def jinja_template(shared_tokenizer_dir):
    jinja2 = pytest.importorskip("jinja2")
    env = jinja2.Environment(extensions=["jinja2.ext.loopcontrols"])
    return env.from_string((shared_tokenizer_dir / "chat_template.jinja").read_text())


def _jinja(template, messages, add_generation_prompt):
    return template.render(messages=messages, add_generation_prompt=add_generation_prompt)


@pytest.mark.parametrize("name", sorted(CONVERSATIONS))
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_matches_checkpoint_template(jinja_template, name, add_generation_prompt):
    messages = CONVERSATIONS[name]
    ours = render_conversation(messages, add_generation_prompt=add_generation_prompt)
    assert ours == _jinja(jinja_template, messages, add_generation_prompt)


_text = st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=20)
_item = st.one_of(st.builds(lambda t: {"type": "text", "text": t}, _text),
                  st.just({"type": "audio", "path": "x.wav"}))
_content = st.one_of(_text, st.lists(_item, max_size=4).filter(
    lambda items: sum(i["type"] == "audio" for i in items) <= 1))  # the jinja template allows one per message
_message = st.builds(lambda role, content: {"role": role, "content": content},
                     st.sampled_from(["user", "assistant"]), _content)


@settings(max_examples=60, deadline=None)
@given(system=st.one_of(st.none(), _content), messages=st.lists(_message, min_size=1, max_size=4),
       add_generation_prompt=st.booleans())
def test_matches_checkpoint_template_property(jinja_template, system, messages, add_generation_prompt):
    if system is not None:
        messages = [{"role": "system", "content": system}, *messages]
    ours = render_conversation(messages, add_generation_prompt=add_generation_prompt)
    assert ours == _jinja(jinja_template, messages, add_generation_prompt)


def test_known_prompt_string():
    messages = [{"role": "user", "content": [{"type": "text", "text": "Transcribe the input speech."},
                                             {"type": "audio", "path": "a.wav"}]}]
    assert render_conversation(messages) == (
        f"<|im_start|>system\n{DEFAULT_SYSTEM_PROMPT}<|im_end|>\n"
        "<|im_start|>user\n<sound>Transcribe the input speech.<|im_end|>\n"
        "<|im_start|>assistant\n")


def test_one_placeholder_per_audio_item():
    # The checkpoint's template would emit a single <sound> here; we emit one per clip.
    messages = [{"role": "user", "content": [{"type": "audio", "path": "a.wav"},
                                             {"type": "text", "text": "Compare "},
                                             {"type": "audio", "url": "https://x/b.wav"},
                                             {"type": "text", "text": "them."}]}]
    rendered = render_conversation(messages, add_generation_prompt=False)
    assert "<|im_start|>user\n<sound><sound>Compare them.<|im_end|>\n" in rendered
    assert conversation_audio(messages) == ["a.wav", "https://x/b.wav"]


def test_custom_audio_token():
    messages = [{"role": "user", "content": [{"type": "audio", "path": "a.wav"}]}]
    assert "<|im_start|>user\n<aud><|im_end|>" in render_conversation(messages, audio_token="<aud>")


def test_conversation_audio_order_across_messages():
    assert conversation_audio(CONVERSATIONS["multi_turn"]) == ["a.wav", "b.wav"]
    assert conversation_audio(CONVERSATIONS["text_only"]) == []
    (clip,) = conversation_audio(CONVERSATIONS["audio_text"])
    assert clip is AUDIO


def test_is_conversation():
    one = CONVERSATIONS["text_only"]
    assert is_conversation(one)
    assert not is_conversation([one, one])
    assert not is_conversation([])
    assert not is_conversation("hello")


@pytest.mark.parametrize("messages, error, match", [
    ([], ValueError, "empty"),
    ("hello", TypeError, "list of messages"),
    (["hello"], TypeError, "message 0 must be a dict"),
    ([{"content": "hi"}], ValueError, "message 0 has no 'role'"),
    ([{"role": "user"}], ValueError, "message 0 has no 'content'"),
    ([{"role": "user", "content": "hi"}, {"role": "usr", "content": "x"}], ValueError, "message 1 has role 'usr'"),
    ([{"role": "user", "content": None}], TypeError, "content must be a string or a list"),
    ([{"role": "user", "content": ["hi"]}], TypeError, "message 0, item 0 must be a dict"),
    ([{"role": "user", "content": [{"type": "image", "url": "x"}]}], ValueError, "type 'image'"),
    ([{"role": "user", "content": [{"text": "hi"}]}], ValueError, "type None"),
    ([{"role": "user", "content": [{"type": "text", "text": 3}]}], ValueError, "string under 'text'"),
    ([{"role": "user", "content": [{"type": "audio"}]}], ValueError, "exactly one of 'audio', 'path' or 'url'"),
    ([{"role": "user", "content": [{"type": "audio", "path": "a", "url": "b"}]}], ValueError,
     r"found \['path', 'url'\]"),
    ([{"role": "user", "content": [{"type": "audio", "audio": None}]}], ValueError, "the audio item's 'audio' is None"),
])
def test_malformed_conversations(messages, error, match):
    with pytest.raises(error, match=match):
        render_conversation(messages)
    with pytest.raises(error, match=match):
        conversation_audio(messages)
