"""af3.processor: placeholder rules, labels, padding, inputs, errors, decoding; parity with HF's processor."""

from __future__ import annotations

import functools
import http.server
import json
import math
import shutil
import threading
import warnings

import numpy as np
import pytest
import soundfile
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from af3.processor import (
    IGNORE_INDEX,
    TRANSCRIPTION_PREFIXES,
    BatchFeature,
    Processor,
    strip_transcription_prefix,
)
from af3.tokenizer import Tokenizer
from af3.windows import audio_token_count
from tests.tiny_tokenizer import write_tiny_tokenizer

SR = 16_000


def clip(seconds: float, seed: int = 0, n: int | None = None) -> np.ndarray:
    """A speech-ish test signal: a few tones plus a little noise, float32 at 16 kHz."""
    n = round(seconds * SR) if n is None else n
    rng = np.random.default_rng(seed)
    t = np.arange(n) / SR
    x = sum(0.2 * np.sin(2 * np.pi * f * t) for f in rng.uniform(100, 3000, size=3))
    return (x + 0.01 * rng.standard_normal(n)).astype(np.float32)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Processor:
    path = write_tiny_tokenizer(tmp_path_factory.mktemp("tiny_tok"))
    return Processor(Tokenizer.from_file(path))


def audio_count(ids: torch.Tensor, processor: Processor) -> int:
    return int((ids == processor.audio_token_id).sum())


# ---- placeholders ---------------------------------------------------------------------------------


def test_one_clip_expands_to_its_token_count(tiny):
    audio = clip(4.0)
    out = tiny("<sound>What is this?", audio=audio)
    n_tokens = audio_token_count(len(audio))
    assert n_tokens == 100  # 25 per second
    ids = out["input_ids"][0]
    assert audio_count(ids, tiny) == n_tokens
    text_ids = tiny.tokenizer.encode("What is this?")
    assert ids.tolist() == [tiny.audio_token_id] * n_tokens + text_ids
    assert out["attention_mask"].tolist() == [[1] * len(ids)]
    assert out["input_ids"].dtype == out["attention_mask"].dtype == torch.int64
    assert out["input_features"].shape == (1, 128, 3000) and out["input_features"].dtype == torch.float32
    assert out["input_features_mask"].shape == (1, 3000)
    assert out["input_features_mask"].sum() == 400  # 4 s / 10 ms
    assert list(out) == ["input_ids", "attention_mask", "input_features", "input_features_mask"]


def test_one_placeholder_per_clip_in_order(tiny):
    a, b = clip(2.0, 1), clip(3.0, 2)
    out = tiny("First <sound> then <sound>.", audio=[[a, b]])
    ids = out["input_ids"][0].tolist()
    runs = _audio_runs(ids, tiny.audio_token_id)
    assert runs == [audio_token_count(len(a)), audio_token_count(len(b))]
    assert out["input_features"].shape[0] == 2


def test_one_placeholder_per_window(tiny):
    audio = clip(45.0)  # two windows: 30 s + 15 s
    out = tiny("<sound> and <sound>", audio=audio)
    assert _audio_runs(out["input_ids"][0].tolist(), tiny.audio_token_id) == [750, 375]
    whole = tiny("<sound> and", audio=audio)
    assert _audio_runs(whole["input_ids"][0].tolist(), tiny.audio_token_id) == [1125]


def test_no_placeholder_prepends_the_audio(tiny):
    a, b = clip(1.0, 1), clip(2.0, 2)
    out = tiny("Describe.", audio=[[a, b]])
    n = audio_token_count(len(a)) + audio_token_count(len(b))
    assert out["input_ids"][0].tolist() == [tiny.audio_token_id] * n + tiny.tokenizer.encode("Describe.")


def test_placeholder_count_errors(tiny):
    with pytest.raises(ValueError, match=r"^sample 1: found 2 placeholders but audio was split into 1 window\(s\)"):
        tiny(["<sound>", "<sound><sound>"], audio=[clip(1.0), clip(1.0)])
    with pytest.raises(ValueError, match=r"^sample 0: found 3 placeholders but audio was split into 2 window\(s\)"):
        tiny("<sound><sound><sound>", audio=clip(31.0))
    with pytest.raises(ValueError, match=r"^sample 0: found 1 placeholders but 2 audio clips were given"):
        tiny("<sound>", audio=[[clip(1.0), clip(1.0)]])
    with pytest.raises(ValueError, match=r"^sample 1: found 1 placeholders but no audio was given"):
        tiny(["<sound>", "<sound>"], audio=[clip(1.0), None])
    with pytest.raises(ValueError, match=r"^sample 0: found 1 placeholders but no audio was given"):
        tiny("<sound> hi")
    with pytest.raises(ValueError, match="got 2 text\\(s\\) but 1 audio entries; they must match 1:1"):
        tiny(["<sound>", "<sound>"], audio=[clip(1.0)])
    with pytest.raises(TypeError, match="got 2 texts but a single ndarray"):
        tiny(["<sound>", "<sound>"], audio=clip(1.0))


@settings(max_examples=15, deadline=None)  # 321 samples: the shortest clip that gives a token
@given(lengths=st.lists(st.integers(321, 40_000), min_size=1, max_size=3),
       mode=st.sampled_from(["per_clip", "none"]), words=st.lists(st.sampled_from(["hi", "the dog", "?"]),
                                                                   max_size=3))
def test_audio_token_count_property(tiny, lengths, mode, words):
    clips = [clip(0, seed, n=n) for seed, n in enumerate(lengths)]
    text = " ".join(words) + ("<sound>" * len(clips) if mode == "per_clip" else "")
    out = tiny(text, audio=[clips])
    assert audio_count(out["input_ids"], tiny) == sum(audio_token_count(n) for n in lengths)
    assert out["input_features_mask"].sum(dim=1).tolist() == [math.ceil(n / 160) for n in lengths]
    assert out["attention_mask"].all()


def test_mixed_batch_with_and_without_audio(tiny):
    out = tiny(["<sound>Hi", "Just text"], audio=[clip(1.0), []])
    assert audio_count(out["input_ids"][0], tiny) == 25
    assert audio_count(out["input_ids"][1], tiny) == 0
    assert out["input_features"].shape[0] == 1


def _audio_runs(ids: list[int], audio_id: int) -> list[int]:
    runs, current = [], 0
    for t in [*ids, None]:
        if t == audio_id:
            current += 1
        elif current:
            runs.append(current)
            current = 0
    return runs


# ---- padding, labels, length, output --------------------------------------------------------------


@pytest.mark.parametrize("side", ["left", "right"])
def test_padding(tiny, side):
    texts = ["Hi", "A much longer prompt than the first"]
    out = tiny(texts, padding_side=side)
    rows = [tiny.tokenizer.encode(t) for t in texts]
    width = max(map(len, rows))
    pad = tiny.tokenizer.pad_token_id
    for row, ids, mask in zip(rows, out["input_ids"].tolist(), out["attention_mask"].tolist()):
        fill = [pad] * (width - len(row))
        assert ids == (fill + row if side == "left" else row + fill)
        ones, zeros = [1] * len(row), [0] * (width - len(row))
        assert mask == (zeros + ones if side == "left" else ones + zeros)


def test_labels_as_hf(tiny):
    pad = tiny.tokenizer.pad_token_id
    out = tiny(["<sound>Hi", "<sound>Say <|endoftext|> longer"], audio=[clip(1.0), clip(0.5)], output_labels=True)
    ids, labels = out["input_ids"], out["labels"]
    masked = (ids == tiny.audio_token_id) | (ids == pad)  # padding and any pad id in the text
    assert bool((labels[masked] == IGNORE_INDEX).all())
    assert torch.equal(labels[~masked], ids[~masked])
    assert list(out)[-1] == "labels"


@pytest.mark.parametrize("which", ["tiny", "ours"])  # the tiny tokenizer, and the real one when present
def test_labels_assistant_turns_only(request, which):
    tiny = request.getfixturevalue(which)
    conversation = [
        {"role": "user", "content": [{"type": "audio", "audio": clip(1.0)}, {"type": "text", "text": "What?"}]},
        {"role": "assistant", "content": "A dog barking."},
        {"role": "user", "content": "Sure?"},
        {"role": "assistant", "content": "\n\nYes, quite sure."},
    ]
    out = tiny.apply_chat_template([conversation, conversation[:2]], add_generation_prompt=False,
                                   output_labels="assistant", padding_side="right")
    for row, (ids, labels) in enumerate(zip(out["input_ids"].tolist(), out["labels"].tolist())):
        learned = [t for t, lab in zip(ids, labels) if lab != IGNORE_INDEX]
        assert all(t == lab for t, lab in zip(ids, labels) if lab != IGNORE_INDEX)
        # The header's newline and the reply's leading newlines may share one token (the real
        # tokenizer merges "\n\n\n"); such a token is learned, as it holds reply text.
        pieces = [tiny.decode([t]) for t in tiny.tokenizer.encode("assistant\n\n\nYes")]
        merged = next(p for p in pieces if "\n" in p) != "\n"
        reply = ("\n" if merged else "") + "\n\nYes, quite sure.<|im_end|>"
        assert tiny.decode(learned) == "A dog barking.<|im_end|>" + (reply if row == 0 else "")
    # With a generation prompt the trailing empty assistant header learns nothing.
    out = tiny.apply_chat_template(conversation[:1], output_labels="assistant")
    assert bool((out["labels"] == IGNORE_INDEX).all())


def test_prompt_too_long(tmp_path):
    processor = Processor(Tokenizer.from_file(write_tiny_tokenizer(tmp_path)), max_length=120)
    assert processor("<sound>", audio=clip(4.0))["input_ids"].shape[1] == 100
    with pytest.raises(ValueError, match=r"sample 1: the prompt is 1\d\d tokens \(audio included\) but the "
                                         r"text model's context is 120 tokens"):
        processor(["<sound>", "<sound> a few more words"], audio=[clip(1.0), clip(4.5)])


def test_batch_feature_to():
    batch = BatchFeature(input_ids=torch.ones(1, 2, dtype=torch.long), input_features=torch.ones(1, 2),
                         input_features_mask=torch.ones(1, 2, dtype=torch.int32))
    assert batch.to("cpu", torch.bfloat16) is batch
    assert batch.input_features.dtype == torch.bfloat16
    assert batch["input_ids"].dtype == torch.long and batch["input_features_mask"].dtype == torch.int32
    with pytest.raises(AttributeError, match="has no 'labels'"):
        _ = batch.labels
    with pytest.raises(TypeError, match="floating-point"):
        batch.to("cpu", torch.int64)
    with pytest.raises(ValueError, match="device 'gpu' is not a torch device"):  # was torch's RuntimeError
        batch.to("gpu")


def test_bad_arguments(tiny):
    with pytest.raises(ValueError, match="output_labels must be"):
        tiny("hi", output_labels="all")
    with pytest.raises(ValueError, match="padding_side must be"):
        tiny("hi", padding_side="center")
    with pytest.raises(TypeError, match="text must be a string"):
        tiny(3)
    with pytest.raises(TypeError, match=r"text\[1\] must be a string"):
        tiny(["a", None])
    with pytest.raises(ValueError, match="text is an empty list"):
        tiny([])
    with pytest.raises(FileNotFoundError, match="clip 0 of sample 0: audio file not found"):
        tiny("<sound>", audio="/nonexistent/a.wav")
    with pytest.raises(ValueError, match="clip 0 of sample 0: .*NaN"):
        tiny("<sound>", audio=np.full(100, np.nan, dtype=np.float32))
    with pytest.raises(ValueError, match="not a single token"):
        Processor(tiny.tokenizer, audio_token="<nope>")
    with pytest.raises(TypeError, match=r"num_mel_bins must be a positive int, got \{'sampling_rate': 16000\}"):
        Processor(tiny.tokenizer, {"sampling_rate": 16000})
    with pytest.raises(ValueError, match="max_length"):
        Processor(tiny.tokenizer, max_length=0)


# ---- audio inputs ---------------------------------------------------------------------------------


def test_audio_input_kinds_agree(tiny, tmp_path):
    audio = clip(2.0)
    path = tmp_path / "a.wav"
    soundfile.write(path, audio, SR, subtype="FLOAT")
    outs = [tiny("<sound>hi", audio=a) for a in (audio, torch.from_numpy(audio), str(path), path,
                                                  audio.astype(np.float64))]
    for out in outs[1:]:
        assert torch.equal(out["input_ids"], outs[0]["input_ids"])
        torch.testing.assert_close(out["input_features"], outs[0]["input_features"], atol=1e-6, rtol=0)


DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("device", DEVICES)
def test_tensor_audio_stays_on_its_device(tiny, device):
    audio = torch.from_numpy(clip(2.0))
    reference = tiny("<sound>hi", audio=audio)
    out = tiny("<sound>hi", audio=audio.to(device))
    assert out["input_features"].device.type == device
    assert out["input_ids"].device.type == "cpu"  # token ids are made on the CPU; .to() moves them
    out = out.to(device, torch.float16)
    assert all(v.device.type == device for v in out.values())
    assert out["input_features"].dtype == torch.float16 and out["input_ids"].dtype == torch.int64
    assert torch.equal(out["input_ids"].cpu(), reference["input_ids"])
    torch.testing.assert_close(out["input_features"].float().cpu(), reference["input_features"],
                               atol=2e-3, rtol=0)


def test_sampling_rate_resamples(tiny):
    out = tiny("<sound>", audio=clip(4.0)[::2].copy(), sampling_rate=8000)
    assert audio_count(out["input_ids"], tiny) == 100
    assert out["input_features_mask"].sum() == 400


def test_long_audio_warns_and_truncates(tiny):
    audio = np.zeros(11 * 60 * SR, dtype=np.float32)
    with pytest.warns(UserWarning, match=r"660\.0 s"):
        out = tiny("<sound>", audio=audio)
    assert audio_count(out["input_ids"], tiny) == 15_000
    assert out["input_features"].shape == (20, 128, 3000)


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:
        pass


def test_chat_items_by_path_url_and_array(tiny, tmp_path, monkeypatch):
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")
    audio = clip(2.0)
    soundfile.write(tmp_path / "a.wav", audio, SR, subtype="FLOAT")
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0),
                                            functools.partial(_QuietHandler, directory=str(tmp_path)))
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{httpd.server_address[1]}/a.wav"
        items = [{"type": "audio", "path": str(tmp_path / "a.wav")}, {"type": "audio", "url": url},
                 {"type": "audio", "audio": torch.from_numpy(audio)}]
        outs = [tiny.apply_chat_template([{"role": "user", "content": [item, {"type": "text", "text": "hi"}]}])
                for item in items]
    finally:
        httpd.shutdown()
        httpd.server_close()
    for out in outs[1:]:
        assert torch.equal(out["input_ids"], outs[0]["input_ids"])
        torch.testing.assert_close(out["input_features"], outs[0]["input_features"], atol=1e-6, rtol=0)


# ---- conversations ---------------------------------------------------------------------------------


def test_apply_chat_template(tiny):
    a, b = clip(1.0, 1), clip(2.0, 2)
    conversation = [{"role": "user", "content": [{"type": "audio", "audio": a}, {"type": "text", "text": "vs"},
                                                 {"type": "audio", "audio": b}]}]
    prompt = tiny.apply_chat_template(conversation, tokenize=False)
    assert prompt.endswith("<|im_start|>user\n<sound><sound>vs<|im_end|>\n<|im_start|>assistant\n")
    assert tiny.apply_chat_template([conversation, conversation], tokenize=False) == [prompt, prompt]
    out = tiny.apply_chat_template(conversation)
    direct = tiny(prompt, audio=[[a, b]])
    for key in direct:
        assert torch.equal(out[key], direct[key]), key
    assert _audio_runs(out["input_ids"][0].tolist(), tiny.audio_token_id) == [25 + 50]  # adjacent runs
    ids = tiny.apply_chat_template(conversation, return_dict=False)
    assert torch.equal(ids, out["input_ids"])
    text_only = tiny.apply_chat_template([{"role": "user", "content": "hi"}])
    assert "input_features" not in text_only
    with pytest.raises(ValueError, match="conversation is empty"):
        tiny.apply_chat_template([])


def test_apply_chat_template_bad_arguments(tiny):
    one = [{"role": "user", "content": "hi"}]
    with pytest.raises(ValueError, match="conversation 1: the conversation is empty"):
        tiny.apply_chat_template([one, []])
    with pytest.raises(TypeError, match=r"conversation 0: message 0 must be a dict"):
        tiny.apply_chat_template([["hi"], one])
    with pytest.raises(TypeError, match="conversation must be"):
        tiny.apply_chat_template("hi")
    for flag in ("tokenize", "add_generation_prompt", "return_dict"):
        with pytest.raises(TypeError, match=f"{flag} must be True or False, got None"):
            tiny.apply_chat_template(one, **{flag: None})


def test_apply_transcription_request(tiny):
    a, b = clip(1.0, 1), clip(2.0, 2)
    out = tiny.apply_transcription_request([a, b], prompt=["Say it.", None])
    prompts = [tiny.apply_chat_template([{"role": "user", "content": [{"type": "text", "text": p},
                                                                      {"type": "audio", "audio": x}]}],
                                        tokenize=False) for p, x in [("Say it.", a),
                                                                     ("Transcribe the input speech.", b)]]
    direct = tiny(prompts, audio=[a, b])
    for key in direct:
        assert torch.equal(out[key], direct[key]), key
    single = tiny.apply_transcription_request(a)
    assert single["input_ids"].shape[0] == 1
    with pytest.raises(ValueError, match=r"got 1 prompt\(s\) for 2 audio clip\(s\)"):
        tiny.apply_transcription_request([a, b], prompt=["x"])
    with pytest.raises(TypeError, match="prompt 0 must be a string"):
        tiny.apply_transcription_request([a], prompt=[3])
    with pytest.raises(ValueError, match="audio is empty"):
        tiny.apply_transcription_request([])
    with pytest.raises(TypeError, match="audio clip 1 is None"):
        tiny.apply_transcription_request([a, None])


# ---- decoding --------------------------------------------------------------------------------------


def test_decode_and_batch_decode(tiny):
    texts = ["The spoken content of the audio is \"hello there\".", "plain"]
    rows = [tiny.tokenizer.encode(t) for t in texts]
    assert tiny.decode(rows[0]) == texts[0]
    assert tiny.decode(torch.tensor(rows[0])) == texts[0]
    assert tiny.decode(rows[0], strip_prefix=True) == "hello there"
    padded = tiny(texts, padding_side="right")["input_ids"]
    assert tiny.batch_decode(padded, skip_special_tokens=True, strip_prefix=True) == ["hello there", "plain"]
    assert tiny.decode(padded, skip_special_tokens=True) == texts
    assert tiny.batch_decode(rows) == texts
    with pytest.raises(ValueError, match="batch_decode takes a batch"):
        tiny.batch_decode(rows[0])
    with pytest.raises(TypeError, match="token id 0 must be an int"):
        tiny.decode(["a"])
    # One id, and an empty batch, as HF's decode / batch_decode take them.
    assert tiny.decode(rows[1][0]) == tiny.decode(torch.tensor(rows[1][0])) == tiny.decode(rows[1][:1])
    assert tiny.batch_decode([]) == []
    with pytest.raises(ValueError, match="token id -100 is negative"):  # labels, unmasked
        tiny.batch_decode(torch.tensor([[rows[1][0], IGNORE_INDEX]]))


def test_clip_too_short_for_one_token_is_an_error(tiny):
    # 320 samples are 2 mel frames: 0 tokens, so the clip's <sound> would silently vanish.
    with pytest.raises(ValueError, match=r"clip 0 of sample 1: 320 samples is too short .* more than 320 samples"):
        tiny(["<sound>a", "<sound>b"], audio=[clip(1.0), clip(0, n=320)])
    out = tiny("<sound>b", audio=clip(0, n=321))
    assert audio_count(out["input_ids"], tiny) == 1


def test_list_of_numbers_is_not_a_batch_of_clips(tiny):
    with pytest.raises(TypeError, match="audio is a list of 3 numbers; pass a clip's samples as a numpy array"):
        tiny("<sound>hi", audio=[0.0, 0.1, 0.2])
    with pytest.raises(TypeError, match="audio is a list of 2 numbers"):  # numpy's scalars, as list(array) gives
        tiny("<sound>hi", audio=list(np.zeros(2, dtype=np.float32)))


def test_processor_checks_each_clip_for_nan_once(tiny, monkeypatch):
    calls = []
    isfinite = torch.isfinite
    monkeypatch.setattr(torch, "isfinite", lambda x: calls.append(x.shape) or isfinite(x))
    tiny(["<sound>a", "<sound>b"], audio=[clip(1.0), clip(0.5)])
    assert len(calls) == 2  # in load_audio; extract_features does not check again


@pytest.mark.parametrize("prefix", TRANSCRIPTION_PREFIXES)
@pytest.mark.parametrize("quote", ['"', "'", ""])
@pytest.mark.parametrize("period", [".", ""])
def test_strip_prefix(prefix, quote, period):
    text = f"  {prefix} {quote}Hello, world{quote}{period}\n"
    assert strip_transcription_prefix(text) == "Hello, world"


@pytest.mark.parametrize("text, expected", [
    ("no framing here.", "no framing here"),
    ('"quoted"', "quoted"),
    ("'mismatched\"", "'mismatched\""),
    ('The spoken content of the audio is "a." .', "a."),  # one period and one pair of quotes only
    ("", ""),
    ('"', '"'),
])
def test_strip_prefix_edges(text, expected):
    assert strip_transcription_prefix(text) == expected


@settings(max_examples=50, deadline=None)
@given(body=st.text(alphabet=st.characters(blacklist_categories=("Cs", "Zs", "Cc"),
                                           blacklist_characters="'\"."), min_size=1, max_size=30),
       prefix=st.sampled_from(TRANSCRIPTION_PREFIXES), quote=st.sampled_from(['"', "'", ""]))
def test_strip_prefix_property(body, prefix, quote):
    assert strip_transcription_prefix(f"{prefix} {quote}{body}{quote}.") == body.strip()


# ---- parity with transformers' AudioFlamingo3Processor -------------------------------------------


@pytest.fixture(scope="module")
def hf_dir(shared_tokenizer_dir, tmp_path_factory):
    """A tiny HF-layout processor directory: the real tokenizer files and a 128-bin Whisper extractor."""
    transformers = pytest.importorskip("transformers")
    directory = tmp_path_factory.mktemp("hf_af3")
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        shutil.copy(shared_tokenizer_dir / name, directory / name)
    transformers.WhisperFeatureExtractor(feature_size=128).save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def hf(hf_dir):
    import transformers
    return transformers.AudioFlamingo3Processor.from_pretrained(hf_dir)


@pytest.fixture(scope="module")
def ours(hf_dir):
    config = json.loads((hf_dir / "preprocessor_config.json").read_text())
    return Processor(Tokenizer.from_file(hf_dir / "tokenizer.json"), config["feature_size"])


def assert_same(ours_out, hf_out):
    assert set(ours_out) == set(hf_out), (sorted(ours_out), sorted(hf_out))
    for key, theirs in hf_out.items():
        mine = ours_out[key]
        assert mine.dtype == theirs.dtype, (key, mine.dtype, theirs.dtype)
        if key == "input_features":
            torch.testing.assert_close(mine, theirs, atol=1e-4, rtol=0)
        else:
            assert torch.equal(mine, theirs), key


CLIP_4S, CLIP_45S = clip(4.0, 1), clip(45.0, 2)
PARITY_CONVERSATIONS = {
    "one_clip_and_text": [[{"role": "user", "content": [{"type": "text", "text": "What is happening here?"},
                                                        {"type": "audio", "audio": CLIP_4S}]}]],
    "batch_4s_45s": [
        [{"role": "user", "content": [{"type": "text", "text": "Transcribe."},
                                      {"type": "audio", "audio": CLIP_4S}]}],
        [{"role": "user", "content": [{"type": "audio", "audio": CLIP_45S},
                                      {"type": "text", "text": "Describe the music in detail, then name "
                                                               "the instruments you can hear."}]}],
    ],
    "multi_turn": [[
        {"role": "user", "content": [{"type": "audio", "audio": CLIP_4S},
                                     {"type": "text", "text": "What instrument is this?"}]},
        {"role": "assistant", "content": "It is a violin."},
        {"role": "user", "content": [{"type": "text", "text": "Is it played solo?"}]},
    ]],
    "text_only": [[{"role": "user", "content": "What is the capital of France?"}]],
    "audio_only": [[{"role": "user", "content": [{"type": "audio", "audio": CLIP_4S}]}]],
    "system_message": [[{"role": "system", "content": "Answer briefly."},
                        {"role": "user", "content": [{"type": "audio", "audio": CLIP_4S},
                                                     {"type": "text", "text": "Describe."}]}]],
    "exactly_30s": [[{"role": "user", "content": [{"type": "audio", "audio": clip(0, 3, n=480_000)},
                                                  {"type": "text", "text": "Describe."}]}]],
    "30s_plus_one_sample": [[{"role": "user", "content": [{"type": "audio", "audio": clip(0, 4, n=480_001)},
                                                          {"type": "text", "text": "Describe."}]}]],
}


@pytest.mark.parametrize("name", sorted(PARITY_CONVERSATIONS))
@pytest.mark.parametrize("output_labels", [False, True])
def test_parity_apply_chat_template(ours, hf, name, output_labels):
    conversations = PARITY_CONVERSATIONS[name]
    batch = conversations if len(conversations) > 1 else conversations[0]
    assert ours.apply_chat_template(batch, tokenize=False) == hf.apply_chat_template(
        batch, tokenize=False, add_generation_prompt=True)
    hf_out = hf.apply_chat_template(batch, tokenize=True, add_generation_prompt=True, return_dict=True,
                                    processor_kwargs={"output_labels": output_labels})
    assert_same(ours.apply_chat_template(batch, output_labels=output_labels), hf_out)


@pytest.mark.parametrize("side", ["left", "right"])
def test_parity_call_batch(ours, hf, side):
    texts = ["<sound>Transcribe.", "Describe <sound> in detail, then name the instruments."]
    audio = [CLIP_4S, CLIP_45S]
    hf_out = hf(text=list(texts), audio=list(audio), output_labels=True, padding_side=side)
    assert_same(ours(texts, audio=audio, output_labels=True, padding_side=side), hf_out)
    assert hf_out["input_features"].shape[0] == 3  # 1 + 2 windows


def test_parity_transcription_request(ours, hf):
    audio = [CLIP_4S, clip(7.5, 5)]
    assert_same(ours.apply_transcription_request(audio, prompt=[None, "Write down what is said."]),
                hf.apply_transcription_request(audio, prompt=[None, "Write down what is said."]))


def test_parity_eleven_minutes(ours, hf):
    audio = clip(0, 6, n=11 * 60 * SR)
    conversation = [{"role": "user", "content": [{"type": "audio", "audio": audio},
                                                 {"type": "text", "text": "Summarise."}]}]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        mine = ours.apply_chat_template(conversation)
    assert any("660.0 s" in str(w.message) for w in caught), [str(w.message) for w in caught]
    theirs = hf.apply_chat_template(conversation, tokenize=True, add_generation_prompt=True, return_dict=True)
    assert_same(mine, theirs)
    assert int((mine["input_ids"] == ours.audio_token_id).sum()) == 15_000
    assert math.isclose(mine["input_features_mask"].sum().item(), 20 * 3000)


def test_parity_decode(ours, hf):
    texts = ['The spoken content of the audio is "Hello there".', "The transcription of the audio is 'Hi'.",
             "The content of the input audio is a dog barking."]
    ids = hf.tokenizer(texts, padding=True, return_tensors="pt")["input_ids"]
    for strip in (False, True):
        assert ours.batch_decode(ids, skip_special_tokens=True, strip_prefix=strip) == hf.batch_decode(
            ids, skip_special_tokens=True, strip_prefix=strip)
