"""The bundle API on a tiny random checkpoint, made the way users make theirs: an HF-layout
checkpoint written by transformers, converted by weights_convert, loaded by af3.load."""

from __future__ import annotations

import numpy as np
import pytest
import soundfile
import torch

import af3
from af3.bundle import THINK_PROMPT, add_think_prompt
from af3.generation import generate
from weights_convert.convert import convert

GREEDY = {"do_sample": False, "max_new_tokens": 8}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from tests.tiny_checkpoint import tiny_hf_model, write_tiny_hf_checkpoint

    root = tmp_path_factory.mktemp("bundle")
    # Every file by save_pretrained; context for a 45 s clip (1125 audio tokens), prompt and reply.
    write_tiny_hf_checkpoint(root / "hf", style="new", seed=0, max_position_embeddings=CONTEXT)
    convert(root / "hf", root / "af3")
    return af3.load(root / "af3"), tiny_hf_model(seed=0, max_position_embeddings=CONTEXT), root / "hf"


CONTEXT = 2048


@pytest.fixture(scope="module")
def hf_processor(tiny):
    """transformers' own AudioFlamingo3Processor, loaded from the files its save_pretrained wrote
    (tokenizer, feature extractor, chat template), padding on the left as for generation."""
    import transformers

    processor = transformers.AudioFlamingo3Processor.from_pretrained(tiny[2])
    processor.tokenizer.padding_side = "left"
    return processor


def clip(seconds: float, seed: int = 0) -> np.ndarray:
    return (0.1 * np.random.default_rng(seed).standard_normal(int(16000 * seconds))).astype(np.float32)


def test_transcribe_equals_transformers_processor_generate_and_decode(tiny, hf_processor):
    """The expected side is all transformers: its processor makes the inputs (a 45 s clip, two
    windows, beside a 3 s one), its generate decodes, its tokenizer turns ids into text."""
    m, hf, _ = tiny
    clips = [clip(45.0, 4), clip(3.0)]
    inputs = hf_processor.apply_transcription_request(clips)
    assert inputs["input_features"].shape[0] == 3  # 2 + 1 windows
    theirs = hf.generate(**inputs, max_new_tokens=8, do_sample=False, repetition_penalty=1.05,
                         eos_token_id=m.generation_config.eos_token_id,
                         pad_token_id=m.generation_config.pad_token_id)
    expected = hf_processor.batch_decode(theirs[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True,
                                         strip_prefix=True)
    assert all(expected), "the replies should hold some text"
    # One chunk of up to 10 minutes is HF's one multi-window prompt (by default transcribe cuts 30 s chunks).
    assert m.transcribe(clips, chunk_seconds=600, **GREEDY) == expected


def test_transcribe_list_batches_like_singles(tiny):
    m, _, _ = tiny
    clips = [clip(3.0), clip(1.0, 1), clip(2.0, 2)]
    singles = [m.transcribe(c, **GREEDY) for c in clips]
    assert m.transcribe(clips, **GREEDY) == singles
    assert m.transcribe(clips, batch_size=2, **GREEDY) == singles
    prompts = ["Transcribe the input speech.", None, "What is said?"]
    assert m.transcribe(clips, prompts, **GREEDY)[:2] == singles[:2]


def test_stream_pieces_join_to_the_reply(tiny):
    m, _, _ = tiny
    pieces: list[str] = []
    reply = m.chat(conversation("Describe it."), stream=pieces.append, seed=3, max_new_tokens=12)
    assert "".join(pieces) == reply and len(pieces) > 1
    # Seeded sampling repeats itself.
    assert m.chat(conversation("Describe it."), seed=3, max_new_tokens=12) == reply


def conversation(text: str = "What do you hear?", seconds: float = 2.0) -> list[dict]:
    return [{"role": "user", "content": [{"type": "audio", "audio": clip(seconds)},
                                         {"type": "text", "text": text}]}]


def test_chat_think_and_batched_generate(tiny):
    m, _, _ = tiny
    conv = conversation()
    thought = add_think_prompt(conv)
    assert thought[-1]["content"][-1]["text"] == f"What do you hear? {THINK_PROMPT}"
    assert conv[-1]["content"][-1]["text"] == "What do you hear?"  # the caller's list is not changed
    assert add_think_prompt([{"role": "user", "content": "Hi"}])[0]["content"] == f"Hi {THINK_PROMPT}"
    prompt = m.processor.apply_chat_template(thought, tokenize=False)
    assert prompt.endswith(f"{THINK_PROMPT}<|im_end|>\n<|im_start|>assistant\n")

    reply = m.chat(conv, think=True, **GREEDY)
    assert reply == m.generate([thought], **GREEDY)[0]
    text_only = [{"role": "user", "content": "Hello there"}]
    both = m.generate([conv, text_only], **GREEDY)
    assert both == [m.chat(conv, **GREEDY), m.chat(text_only, **GREEDY)]


def test_chat_session_reuses_the_cache_exactly_and_encodes_audio_once(tiny):
    m, _, _ = tiny
    LONGER = dict(GREEDY, max_new_tokens=90)
    calls = []
    hook = m.model.encoder.register_forward_hook(lambda *_: calls.append(1))
    try:
        session = m.start_chat(clip(2.0), max_tokens=300)
        first = session.ask("What do you hear?", **GREEDY)
        sizes = [session.cache.max_len]
        second = session.ask("Say more.", **GREEDY)
        sizes.append(session.cache.max_len)
        before = session.ids[:, :session.ids.shape[1] - len(m.tokenizer.encode(second))]
        third = session.ask("And then?", **LONGER)
        sizes.append(session.cache.max_len)
    finally:
        hook.remove()
    assert len(calls) == 1  # the audio was encoded once, though the cache grew twice
    # The first turn's cache fits it exactly; each later turn needs more room, and the cache at
    # least doubles (amortised O(1) per token), never past the chat's limit.
    assert sizes[1] == min(2 * sizes[0], 300) and sizes[2] == 300, sizes
    assert [msg["role"] for msg in session.history] == ["user", "assistant"] * 3
    assert session.history[3]["content"] == second
    assert first == m.chat(conversation(), **GREEDY)

    # The same chat with a cache big enough from the start gives the same replies.
    big = m.start_chat(clip(2.0), max_tokens=300)
    big.cache = m.model.new_cache(1, 300)
    replies = [big.ask("What do you hear?", **GREEDY), big.ask("Say more.", **GREEDY), big.ask("And then?", **LONGER)]
    assert replies == [first, second, third]
    assert big.cache.max_len == 300 and torch.equal(big.ids, session.ids)

    # The second reply equals a from-scratch run on the same tokens (cache reuse changes nothing).
    inputs = m.processor.apply_chat_template(conversation())
    redo = generate(m.model, before, input_features=inputs["input_features"],
                    input_features_mask=inputs["input_features_mask"], generation_config=m.generation_config,
                    **GREEDY)
    assert m.tokenizer.decode(redo[0, before.shape[1]:].tolist(), skip_special_tokens=True) == second

    with pytest.raises(ValueError, match="start a new chat"):
        session.ask("Again?", max_new_tokens=300)


def test_bad_arguments(tiny):
    m, _, _ = tiny
    with pytest.raises(ValueError, match="empty"):
        m.transcribe([])
    with pytest.raises(ValueError, match="prompt"):
        m.transcribe([clip(1.0), clip(1.0)], ["a"])
    with pytest.raises(ValueError, match="single clip"):
        m.transcribe([clip(1.0), clip(1.0)], stream=print)
    with pytest.raises(ValueError, match="batch_size"):
        m.transcribe([clip(1.0)], batch_size=0)
    with pytest.raises(ValueError, match="max_new_tokens"):
        m.transcribe(clip(1.0), max_new_tokens=0)
    with pytest.raises(ValueError, match="temperature"):
        m.chat(conversation(), do_sample=True, temperature=0.0)
    with pytest.raises(ValueError, match="unknown generation argument"):
        m.chat(conversation(), num_beams=2)
    with pytest.raises(TypeError, match="conversations must be a non-empty list of conversations"):
        m.generate(conversation())  # one conversation, not a list of them
    with pytest.raises(ValueError, match="user message"):
        add_think_prompt([{"role": "system", "content": "x"}])


def test_failed_turn_leaves_the_chat_as_it_was(tiny):
    m, _, _ = tiny
    session = m.start_chat(clip(2.0), max_tokens=300)
    with pytest.raises(ValueError, match="unknown generation argument"):
        session.ask("What do you hear?", max_new_token=4)  # a typo on the first turn
    assert session.history == [] and session.ids is None and session.cache is None
    first = session.ask("What do you hear?", **GREEDY)
    state = (list(session.history), session.ids.clone())

    def explode(piece):
        raise KeyboardInterrupt("stopped by the user")  # the user stops a streamed reply half-way

    with pytest.raises(KeyboardInterrupt, match="stopped by the user"):
        session.ask("Say more.", stream=explode, **GREEDY)
    with pytest.raises(ValueError, match="start a new chat"):
        session.ask("Say more.", max_new_tokens=300)
    with pytest.raises(TypeError, match="max_new_tokens must be an int"):
        session.ask("Say more.", max_new_tokens="8")
    with pytest.raises(ValueError, match="text holds the audio placeholder '<sound>'"):
        session.ask("Play <sound> again.", **GREEDY)  # was taken as a plain token, with no audio behind it
    assert len(session.history) == 2 and all(a is b for a, b in zip(session.history, state[0]))
    assert torch.equal(session.ids, state[1])

    # The next turn is exactly what a chat without the failures gives.
    clean = m.start_chat(clip(2.0), max_tokens=300)
    assert clean.ask("What do you hear?", **GREEDY) == first
    assert session.ask("Say more.", **GREEDY) == clean.ask("Say more.", **GREEDY)
    assert [msg["role"] for msg in session.history] == ["user", "assistant"] * 2


def test_bundle_argument_types(tiny):
    m, _, _ = tiny
    conv = conversation()
    with pytest.raises(TypeError, match="chat takes one conversation"):
        m.chat([conv, conv], **GREEDY)  # would silently answer only the first
    with pytest.raises(TypeError, match="think must be True or False"):
        m.chat(conv, think="yes")
    with pytest.raises(ValueError, match=r"unknown generation argument\(s\) \['streamer'\].*stream="):
        m.chat(conv, streamer=object())
    with pytest.raises(ValueError, match=r"unknown generation argument\(s\) \['cache'\]"):
        m.transcribe(clip(1.0), cache=None)
    with pytest.raises(TypeError, match="on_text must be a function"):
        m.transcribe(clip(1.0), stream="print", **GREEDY)
    with pytest.raises(TypeError, match="system must be a string"):
        m.start_chat(clip(1.0), system=3)
    with pytest.raises(TypeError, match="message 0 must be a dict"):
        add_think_prompt(["hi"])


def test_parts_are_exposed(tiny):
    m, _, _ = tiny
    assert m.model.generation_config is m.generation_config
    assert m.device == torch.device("cpu") and m.dtype == torch.float32
    assert "AF3(" in repr(m)


def test_start_chat_decodes_its_audio_at_once(tiny, tmp_path):
    m, _, _ = tiny
    with pytest.raises(FileNotFoundError, match="missing.wav"):
        m.start_chat(str(tmp_path / "missing.wav"))  # now, not at the first ask()
    path = tmp_path / "speech.wav"
    soundfile.write(str(path), clip(1.0).astype(np.float32), 16000)
    samples, _ = soundfile.read(str(path), dtype="float32")  # as stored (16-bit PCM)
    session = m.start_chat(str(path), max_tokens=300)
    path.unlink()  # decoded already: the chat no longer needs the file
    reply = session.ask("What do you hear?", max_new_tokens=3, do_sample=False)
    same = [{"role": "user", "content": [{"type": "audio", "audio": samples},
                                         {"type": "text", "text": "What do you hear?"}]}]
    assert reply == m.chat(same, max_new_tokens=3, do_sample=False)
    assert session.history[0]["content"][0] == {"type": "audio", "audio": str(path)}  # as given


def test_a_chat_longer_than_the_context_is_refused_not_cut(tiny) -> None:
    m, _, _ = tiny
    limit = m.config.text.max_position_embeddings
    assert m.start_chat(None, max_tokens=limit).max_tokens == limit
    with pytest.raises(ValueError, match=f"max_tokens {limit + 1} exceeds the model's context of {limit} tokens"):
        m.start_chat(None, max_tokens=limit + 1)


def test_a_clip_too_short_for_any_audio_token_is_refused_at_start_chat(tiny) -> None:
    m, _, _ = tiny
    with pytest.raises(ValueError, match="the audio: 100 samples is too short to give any audio token"):
        m.start_chat(torch.zeros(100))
