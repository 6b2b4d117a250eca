"""Recordings of any length: streamed decoding, quiet-point chunking, segments and subtitle formats,
and chunked transcription against transformers on each chunk."""

from __future__ import annotations

import io
import itertools

import numpy as np
import pytest
import soundfile
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import af3
from af3.audio import AudioError, audio_seconds, iter_audio, load_audio
from af3.longform import (
    Segment,
    chunk_sizes,
    format_srt,
    format_vtt,
    iter_chunks,
    join_text,
    parse_srt,
    parse_vtt,
    quiet_cut,
)
from weights_convert.convert import convert

GREEDY = {"do_sample": False, "max_new_tokens": 5}


def noise(seconds: float, rate: int = 16000, seed: int = 0, channels: int = 1) -> np.ndarray:
    shape = (int(rate * seconds), channels) if channels > 1 else (int(rate * seconds),)
    return (0.1 * np.random.default_rng(seed).standard_normal(shape)).astype(np.float32)


def wav_bytes(samples: np.ndarray, rate: int, fmt: str = "WAV") -> bytes:
    buf = io.BytesIO()
    soundfile.write(buf, samples, rate, format=fmt, subtype="FLOAT" if fmt == "WAV" else None)
    return buf.getvalue()


# ---- streamed decoding --------------------------------------------------------------------------

@pytest.mark.parametrize("rate", [16000, 44100, 8000])
@pytest.mark.parametrize("block_seconds", [0.05, 0.7, 100.0])
def test_iter_audio_blocks_join_to_whole_file_resampling(rate, block_seconds):
    data = wav_bytes(noise(5.3, rate, channels=2), rate)
    whole = load_audio(data, max_seconds=None)  # the whole file decoded and resampled at once
    blocks = list(iter_audio(data, block_seconds))
    joined = torch.cat(blocks)
    assert joined.shape == whole.shape
    torch.testing.assert_close(joined, whole, atol=1e-6, rtol=0)  # float rounding only
    if block_seconds < 5:
        assert len(blocks) > 1


def test_iter_audio_has_no_length_cap_and_reads_the_header_length(tmp_path):
    path = tmp_path / "long.flac"
    soundfile.write(str(path), noise(601.0, 8000), 8000)  # past load_audio's 10 minutes
    assert audio_seconds(path) == pytest.approx(601.0)
    assert sum(b.shape[0] for b in iter_audio(path, 60.0)) == 601 * 16000
    assert audio_seconds(noise(2.0)) == 2.0 and audio_seconds(noise(2.0, channels=2).T) == 2.0


def test_iter_audio_errors_name_the_input(tmp_path):
    with pytest.raises(FileNotFoundError, match="audio file not found: .*nope.wav"):
        iter_audio(tmp_path / "nope.wav")  # at the call, not at the first block
    with pytest.raises(AudioError, match="could not decode audio"):
        iter_audio(b"RIFF not really a wav file")
    with pytest.raises(ValueError, match="block_seconds must be a positive number"):
        iter_audio(noise(1.0), 0)
    bad = noise(3.0)
    bad[40000] = np.nan
    with pytest.raises(AudioError, match="NaN or infinite samples \\(first at sample 40000\\)"):
        list(iter_audio(wav_bytes(bad, 16000), 1.0))
    with pytest.raises(AudioError, match="the audio is empty"):
        list(iter_audio(wav_bytes(np.zeros(0, np.float32), 16000)))


# ---- chunk boundaries ---------------------------------------------------------------------------

@settings(max_examples=150, deadline=None)
@given(n=st.integers(1, 700), chunk=st.integers(2, 120), margin_frac=st.floats(0, 0.99),
       frame=st.integers(1, 9), seed=st.integers(0, 2**16), blocks=st.lists(st.integers(1, 200), min_size=1),
       silent=st.booleans())
def test_chunks_tile_the_audio_with_cuts_within_the_margin(n, chunk, margin_frac, frame, seed, blocks, silent):
    margin = min(int(margin_frac * chunk), chunk - 1)
    rng = np.random.default_rng(seed)
    samples = torch.from_numpy(rng.standard_normal(n).astype(np.float32))
    if silent:  # quiet stretches, so cuts have somewhere to go
        samples[torch.from_numpy(rng.random(n) < 0.3)] = 0.0
    # Any blocking of the stream gives the same chunks.
    pieces, at = [], 0
    for size in blocks * (n // max(1, sum(blocks)) + 1):
        pieces.append(samples[at:at + size])
        at += size
        if at >= n:
            break
    if at < n:
        pieces.append(samples[at:])
    chunks = list(iter_chunks(pieces, chunk, margin, frame))
    assert [(c.start, c.end) for c in chunks] == [(c.start, c.end) for c in iter_chunks([samples], chunk, margin, frame)]
    # Exact cover: each chunk starts where the last ended, and the samples are the audio's.
    assert chunks[0].start == 0 and chunks[-1].end == n
    assert all(a.end == b.start for a, b in itertools.pairwise(chunks))
    assert torch.equal(torch.cat([c.samples for c in chunks]), samples)
    # Every cut within the margin before the nominal boundary; only the last chunk is short.
    for c in chunks[:-1]:
        assert chunk - margin <= c.end - c.start <= chunk
    assert 1 <= chunks[-1].end - chunks[-1].start <= chunk


def test_the_cut_lands_in_the_pause():
    audio = torch.from_numpy(noise(20.0))
    audio[int(6.8 * 16000):int(6.9 * 16000)] = 0.0  # 100 ms of silence, 1.2 s before the 8 s boundary
    chunks = list(iter_chunks([audio], 8 * 16000, 2 * 16000))
    first = chunks[0].end / 16000
    assert 6.8 < first < 6.9
    assert quiet_cut(audio, 8 * 16000, 0) == 8 * 16000  # no margin: the boundary itself
    # Silence everywhere: the latest candidate, the nominal boundary.
    assert quiet_cut(torch.zeros(400), 100, 30, frame=10) == 100


def test_chunk_settings_are_checked():
    assert chunk_sizes(30, 2) == (480000, 32000)
    with pytest.raises(ValueError, match=r"chunk_seconds must be in \(0, 600\]"):
        chunk_sizes(601, 2)
    with pytest.raises(ValueError, match="margin_seconds must be >= 0 and below chunk_seconds"):
        chunk_sizes(10, 10)
    with pytest.raises(ValueError, match="chunk_seconds must be a finite number"):
        chunk_sizes(float("nan"), 1)
    # A chunk that a cut may shorten to 20 ms or less would give no audio token at all.
    assert chunk_sizes(0.5, 0.47) == (8000, 7520)
    for chunk, margin in ((0.02, 0), (0.001, 0), (0.5, 0.48)):
        with pytest.raises(ValueError, match="chunk_seconds - margin_seconds must be more than 0.02 s"):
            chunk_sizes(chunk, margin)


# ---- subtitle formats ---------------------------------------------------------------------------

# Any text a model can write on one line, control characters and Unicode line separators included
# (a tiny model's byte tokens write \x1d and the like): only \n and \r end a subtitle line.
cue_text = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\n\r"),
                   min_size=0, max_size=30).map(str.strip)
lines = st.lists(cue_text.filter(bool), max_size=3).map("\n".join)


@st.composite
def segment_lists(draw):
    n = draw(st.integers(0, 6))
    times = sorted(draw(st.lists(st.integers(0, 10 * 3_600_000), min_size=n + 1, max_size=n + 1)))
    return [Segment(a / 1000, b / 1000, draw(lines)) for a, b in itertools.pairwise(times)]


@settings(max_examples=200, deadline=None)
@given(segment_lists())
def test_srt_and_vtt_parse_back_to_the_same_segments(segments):
    assert parse_srt(format_srt(segments)) == segments
    assert parse_vtt(format_vtt(segments)) == segments


def test_formats_known_answer_and_hostile_text():
    segments = [Segment(0.0, 29.84, "hello"), Segment(29.84, 3725.5, "a <b> & c --> d\n\nsecond line")]
    assert format_srt(segments) == ("1\n00:00:00,000 --> 00:00:29,840\nhello\n\n"
                                    "2\n00:00:29,840 --> 01:02:05,500\na <b> & c --> d\nsecond line\n\n")
    assert format_vtt(segments) == ("WEBVTT\n\n00:00:00.000 --> 00:00:29.840\nhello\n\n"
                                    "00:00:29.840 --> 01:02:05.500\na &lt;b&gt; &amp; c --&gt; d\nsecond line\n\n")
    # The blank line inside the text does not split the cue.
    assert [s.text for s in parse_srt(format_srt(segments))] == ["hello", "a <b> & c --> d\nsecond line"]
    with pytest.raises(ValueError, match="SRT cue 1: no 'HH:MM:SS,mmm --> ...' timing line"):
        parse_srt("1\nnot a time\nhello\n")
    with pytest.raises(ValueError, match="not WebVTT"):
        parse_vtt("1\n00:00:00.000 --> 00:00:01.000\nhi\n")
    assert join_text([Segment(0, 1, "a"), Segment(1, 2, ""), Segment(2, 3, "b")]) == "a b"


# ---- chunked transcription ----------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from tests.tiny_checkpoint import tiny_hf_model, write_tiny_hf_checkpoint

    root = tmp_path_factory.mktemp("longform")
    write_tiny_hf_checkpoint(root / "hf", seed=0)
    convert(root / "hf", root / "af3")
    return af3.load(root / "af3"), tiny_hf_model(seed=0)


def test_each_segment_is_transformers_on_its_chunk(tiny):
    m, hf = tiny
    audio = noise(19.0, seed=3)
    audio[int(6.5 * 16000):int(6.6 * 16000)] = 0.0
    segments = m.transcribe_segments(audio, chunk_seconds=8, margin_seconds=2, batch_size=2, **GREEDY)
    chunks = list(iter_chunks([torch.from_numpy(audio)], 8 * 16000, 2 * 16000))
    assert len(segments) == len(chunks) == 3
    assert [(s.start, s.end) for s in segments] == [(round(c.start / 16) / 1000, round(c.end / 16) / 1000)
                                                    for c in chunks]
    assert 6.5 < segments[0].end < 6.6  # cut in the pause
    for segment, chunk in zip(segments, chunks):
        inputs = m.processor.apply_transcription_request(chunk.samples)
        theirs = hf.generate(**inputs, max_new_tokens=5, do_sample=False, repetition_penalty=1.05,
                             eos_token_id=m.generation_config.eos_token_id,
                             pad_token_id=m.generation_config.pad_token_id)
        expected = m.processor.decode(theirs[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True,
                                      strip_prefix=True)
        assert segment.text == expected.strip()
    # transcribe joins the segments; one at a time, batched, or in a list: the same.
    text = m.transcribe(audio, chunk_seconds=8, margin_seconds=2, **GREEDY)
    assert text == join_text(segments)
    assert m.transcribe([noise(1.0), audio], chunk_seconds=8, margin_seconds=2, batch_size=3,
                        **GREEDY)[1] == text
    pieces: list[str] = []
    assert m.transcribe(audio, chunk_seconds=8, margin_seconds=2, stream=pieces.append, **GREEDY) == text
    assert "".join(pieces).split() == text.split()


def test_transcribe_long_errors_and_progress(tiny, capsys, tmp_path):
    m, _ = tiny
    with pytest.raises(ValueError, match=r"chunk_seconds must be in \(0, 600\]"):
        m.transcribe(noise(1.0), chunk_seconds=700)
    with pytest.raises(FileNotFoundError, match="audio file not found"):
        m.transcribe([noise(1.0), str(tmp_path / "missing.wav")], **GREEDY)
    with pytest.raises(TypeError, match="progress must be True, False or None"):
        m.transcribe(noise(1.0), progress="yes")
    m.transcribe(noise(17.0), chunk_seconds=8, margin_seconds=1, progress=True, **GREEDY)
    err = capsys.readouterr().err
    assert "chunk 3/3, 17 s of audio" in err and "s/s" in err
    # A last chunk of a few samples is padded with silence for the model, not dropped or refused.
    segments = m.transcribe_segments(noise(8.0 + 100 / 16000), chunk_seconds=8, margin_seconds=0, **GREEDY)
    assert [(s.start, s.end) for s in segments] == [(0.0, 8.0), (8.0, 8.006)]


def test_batches_are_sorted_by_length_and_a_failing_chunk_fails_its_recording_alone():
    from af3.longform import Recording, transcribe_recordings

    lengths = [12.0, 1.0, 7.0, 3.0]  # chunks of at most 8 s: 8 + 4, 1, 7, 3
    recordings = [Recording(i, noise(s, seed=i)) for i, s in enumerate(lengths)]
    batches: list[list[float]] = []

    def run_batch(clips, prompts):
        seconds = [round(c.shape[0] / 16000) for c in clips]
        batches.append(seconds)
        if 3 in seconds:
            raise ValueError("the 3 s chunk is cursed")
        return [f"{s}s" for s in seconds]

    def results(**kw):
        batches.clear()
        return [(rec.key, r if isinstance(r, Exception) else join_text(r))
                for rec, r in transcribe_recordings(run_batch, recordings, chunk_seconds=8, margin_seconds=0,
                                                    batch_size=2, **kw)]

    by_length = results(pool=3)
    assert batches[:2] == [[8, 7], [4, 3]] and [3] in batches[2:]  # the failing batch retried chunk by chunk
    in_order = results(pool=1)
    assert batches[:3] == [[8, 4], [1, 7], [3]]
    for got in (by_length, in_order):
        assert [k for k, _ in got] == [0, 1, 2, 3]  # the order given, whatever the batches
        assert [t for _, t in got[:3]] == ["8s 4s", "1s", "7s"]
        assert isinstance(got[3][1], ValueError) and "cursed" in str(got[3][1])
