"""Audio input: decoding files, bytes, file objects and URLs; arrays; resampling; bad input."""

from __future__ import annotations

import functools
import http.server
import io
import math
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import soundfile
import torch
import torchaudio

import af3.audio
from af3.audio import AudioError, load_audio

SR = 16_000


def sine(n: int, rate: int, freq: float = 440.0, channels: int = 1) -> np.ndarray:
    t = np.arange(n) / rate
    x = np.stack([0.5 * np.sin(2 * np.pi * freq * (c + 1) * t) for c in range(channels)], axis=1)
    return x.astype(np.float32)  # (n, channels)


def peak_hz(x: torch.Tensor) -> float:
    spectrum = torch.fft.rfft(x.double()).abs()
    return float(spectrum.argmax()) * SR / x.shape[0]


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("audio")
    out = {}
    out["wav"] = d / "mono16k.wav"
    soundfile.write(out["wav"], sine(SR, SR), SR, subtype="PCM_16")
    out["flac"] = d / "stereo44k.flac"
    soundfile.write(out["flac"], sine(44_100, 44_100, channels=2), 44_100)
    out["ogg"] = d / "mono48k.ogg"
    soundfile.write(out["ogg"], sine(48_000, 48_000), 48_000, format="OGG", subtype="VORBIS")
    out["mp3"] = d / "mono22k.mp3"  # libsndfile >= 1.1 writes MP3 through LAME
    soundfile.write(out["mp3"], sine(22_050, 22_050), 22_050, format="MP3")
    out["long"] = d / "long44k.wav"
    soundfile.write(out["long"], sine(3 * 44_100, 44_100), 44_100, subtype="FLOAT")
    out["text"] = d / "notes.wav"
    out["text"].write_text("this is not audio\n" * 20)
    return out


def test_wav_at_16k_is_read_exactly(files) -> None:
    x = load_audio(files["wav"])
    ref, _ = soundfile.read(files["wav"], dtype="float32")
    assert x.dtype == torch.float32 and x.ndim == 1
    assert torch.equal(x, torch.from_numpy(ref))


def test_stereo_flac_is_averaged_and_resampled(files) -> None:
    x = load_audio(str(files["flac"]))
    stereo, _ = soundfile.read(files["flac"], dtype="float32")
    ref = torchaudio.functional.resample(torch.from_numpy(stereo).mean(1), 44_100, SR)
    assert x.shape == (SR,)
    torch.testing.assert_close(x, ref)


@pytest.mark.parametrize("kind, rate", [("ogg", 48_000), ("mp3", 22_050)])
def test_lossy_formats(files, kind: str, rate: int) -> None:
    x = load_audio(files[kind])
    # Lossy codecs add encoder delay and padding: check duration, pitch and level, not samples.
    assert abs(x.shape[0] - SR) < 0.1 * SR
    assert abs(peak_hz(x) - 440.0) < 2.0
    rms = float(x.pow(2).mean().sqrt())
    assert abs(rms - 0.5 / math.sqrt(2)) < 0.05


def test_bytes_and_file_objects_match_the_path(files) -> None:
    ref = load_audio(files["flac"])
    data = files["flac"].read_bytes()
    assert torch.equal(load_audio(data), ref)
    assert torch.equal(load_audio(bytearray(data)), ref)
    assert torch.equal(load_audio(io.BytesIO(data)), ref)
    with open(files["flac"], "rb") as f:
        assert torch.equal(load_audio(f), ref)

    class Unseekable:  # e.g. a pipe or a socket
        def __init__(self) -> None:
            self.buffer = io.BytesIO(data)

        def read(self, n: int = -1) -> bytes:
            return self.buffer.read(n)

    assert torch.equal(load_audio(Unseekable()), ref)


def test_long_file_decodes_only_the_first_seconds(files, monkeypatch) -> None:
    asked = []
    original = soundfile.SoundFile.read

    def spy(self, frames=-1, *args, **kwargs):
        asked.append(frames)
        return original(self, frames, *args, **kwargs)

    monkeypatch.setattr(soundfile.SoundFile, "read", spy)
    with pytest.warns(UserWarning, match=r"long44k\.wav: 3\.0 s of audio; only the first 1 s"):
        x = load_audio(files["long"], max_seconds=1.0)
    # 1 s kept + the resampler's context (882 frames at 44.1 kHz), not all 3 s.
    assert sum(asked) == 44_100 + af3.audio._resample_context(44_100, "x") == 44_982
    assert x.shape == (SR,)
    full = load_audio(files["long"], max_seconds=None)
    assert full.shape == (3 * SR,)
    assert torch.equal(load_audio(files["long"], max_seconds=float("inf")), full)  # was an OverflowError
    torch.testing.assert_close(x, full[:SR], atol=1e-5, rtol=0)


def test_default_limit_is_ten_minutes() -> None:
    assert af3.audio.MAX_SECONDS == 600.0


# ---- arrays -------------------------------------------------------------------------------


def test_float_arrays() -> None:
    x = np.linspace(-1, 1, 1000)  # float64
    out = load_audio(x)
    assert out.dtype == torch.float32 and torch.equal(out, torch.from_numpy(x.astype(np.float32)))
    assert torch.equal(load_audio(torch.from_numpy(x).half()), torch.from_numpy(x).half().float())
    big_endian = x.astype(">f4")
    assert torch.equal(load_audio(big_endian), out)
    assert torch.equal(load_audio(x[::-1]), out.flip(0))  # negative strides


def test_integer_pcm_is_scaled() -> None:
    assert load_audio(np.array([-32768, 0, 16384], np.int16)).tolist() == [-1.0, 0.0, 0.5]
    assert load_audio(torch.tensor([-32768, 16384], dtype=torch.int16)).tolist() == [-1.0, 0.5]
    assert load_audio(np.array([-2**31, 2**30], np.int32)).tolist() == [-1.0, 0.5]
    assert load_audio(np.array([0, 128, 192], np.uint8)).tolist() == [-1.0, 0.0, 0.5]
    assert load_audio(np.array([-128, 64], np.int8)).tolist() == [-1.0, 0.5]


def test_channels_either_layout() -> None:
    stereo = np.stack([np.full(100, 0.2), np.full(100, 0.4)]).astype(np.float32)  # (2, 100)
    expected = torch.full((100,), 0.3)
    torch.testing.assert_close(load_audio(stereo), expected)
    torch.testing.assert_close(load_audio(stereo.T), expected)
    torch.testing.assert_close(load_audio(torch.from_numpy(stereo)), expected)
    assert load_audio(np.ones((1, 50), np.float32)).shape == (50,)
    assert load_audio(np.ones((50, 1), np.float32)).shape == (50,)


def test_array_resampling() -> None:
    x = torch.from_numpy(sine(8_000, 8_000)[:, 0])
    out = load_audio(x, sampling_rate=8_000)
    assert out.shape == (SR,)
    torch.testing.assert_close(out, torchaudio.functional.resample(x, 8_000, SR))
    assert torch.equal(load_audio(x, sampling_rate=16_000.0), x)  # a whole-number float is fine


@pytest.mark.parametrize(
    "source, error, match",
    [
        (np.zeros(0, np.float32), AudioError, r"array of shape \(0,\): the audio is empty"),
        (np.zeros((2, 0), np.float32), AudioError, r"shape \(2, 0\): the audio is empty"),
        (torch.zeros(0, 2), AudioError, r"shape \(0, 2\): the audio is empty"),
        (torch.zeros(0), AudioError, "tensor of shape .*empty"),
        (np.array([0.0, 0.1, np.nan]), AudioError, "NaN or infinite samples \\(first at sample 2\\)"),
        (torch.tensor([np.inf, 0.0]), AudioError, "first at sample 0"),
        (np.zeros((3, 3), np.float32), AudioError, "cannot tell the channel axis"),
        (np.zeros((40, 500), np.float32), AudioError, "at most 16 channels"),
        (np.zeros((2, 2, 100), np.float32), AudioError, "got 3-D"),
        (np.array(0.5), AudioError, "got 0-D"),
        (np.array([1, 2, 3]), TypeError, "int64 are ambiguous"),
        (np.array([True, False]), TypeError, "dtype bool are not audio"),
        (torch.tensor([1j, 2j]), TypeError, "complex64 are ambiguous"),
        ([0.0, 0.1, 0.2], TypeError, "unsupported audio source of type list"),
        (42, TypeError, "unsupported audio source of type int"),
    ],
)
def test_bad_arrays_and_types(source, error, match) -> None:
    with pytest.raises(error, match=match):
        load_audio(source)


@pytest.mark.parametrize("rate, error", [(0, ValueError), (-16000, ValueError), (44_100.5, ValueError),
                                         (True, TypeError), ("16000", TypeError)])
def test_bad_sampling_rate(rate, error) -> None:
    with pytest.raises(error, match="sampling_rate"):
        load_audio(np.zeros(10, np.float32), sampling_rate=rate)


@pytest.mark.parametrize("rate", [44_101, 10**12])
def test_rate_whose_resampling_filter_is_too_big(rate) -> None:
    # torchaudio would try to allocate gigabytes (a RuntimeError from the allocator, or minutes of work).
    with pytest.raises(AudioError, match=f"cannot resample {rate} Hz to 16000 Hz: the rates share only"):
        load_audio(np.zeros(100, np.float32), sampling_rate=rate)


def test_bad_max_seconds() -> None:
    with pytest.raises(ValueError, match="max_seconds"):
        load_audio(np.zeros(10, np.float32), max_seconds=0)
    with pytest.raises(TypeError, match="max_seconds must be a number or None, got str"):
        load_audio(np.zeros(10, np.float32), max_seconds="10")


def test_path_given_as_bytes_and_closed_file(files) -> None:
    with pytest.raises(TypeError, match=r"hold the path '.*mono16k\.wav', not audio; pass paths as str"):
        load_audio(bytes(files["wav"]))
    with open(files["wav"], "rb") as f:
        pass
    with pytest.raises(ValueError, match=r"file object '.*mono16k\.wav' is closed"):
        load_audio(f)


# ---- bad files ------------------------------------------------------------------------------


def test_missing_file(tmp_path) -> None:
    missing = tmp_path / "nope.wav"
    with pytest.raises(FileNotFoundError, match="nope.wav"):
        load_audio(missing)


def test_directory(tmp_path) -> None:
    with pytest.raises(AudioError, match="is a directory"):
        load_audio(tmp_path)


def test_non_audio_file_names_the_path(files) -> None:
    with pytest.raises(AudioError, match=r"notes\.wav: could not decode audio"):
        load_audio(files["text"])


def test_corrupt_bytes(files) -> None:
    with pytest.raises(AudioError, match=r"audio bytes \(450 bytes\): could not decode audio \(Format not"):
        load_audio(b"\x00\x01garbage" * 50)
    truncated = files["flac"].read_bytes()[:30]  # header cut short
    with pytest.raises(AudioError, match="audio bytes"):
        load_audio(truncated)


def test_empty_file(tmp_path) -> None:
    empty = tmp_path / "silence.wav"
    soundfile.write(empty, np.zeros((0, 1), np.float32), SR)
    with pytest.raises(AudioError, match=r"silence\.wav: the audio is empty"):
        load_audio(empty)


def test_text_mode_file(files) -> None:
    with open(files["text"]) as f, pytest.raises(TypeError, match="text mode"):
        load_audio(f)


def test_sampling_rate_disagreeing_with_the_file(files) -> None:
    with pytest.raises(AudioError, match="sampling_rate=16000 was given but the file is at 44100 Hz"):
        load_audio(files["flac"], sampling_rate=16_000)
    assert load_audio(files["flac"], sampling_rate=44_100).shape == (SR,)


# ---- URLs ------------------------------------------------------------------------------------


class _Handler(http.server.SimpleHTTPRequestHandler):
    def do_GET(self) -> None:
        if self.path == "/slow.wav":
            time.sleep(1.0)
            self.path = "/mono16k.wav"
        super().do_GET()

    def log_message(self, *args) -> None:  # keep pytest output clean
        pass


class _Server(http.server.ThreadingHTTPServer):
    def handle_error(self, request, client_address) -> None:
        pass  # the timeout test hangs up on purpose; no broken-pipe tracebacks


@pytest.fixture(scope="module")
def server(files):
    handler = functools.partial(_Handler, directory=str(files["wav"].parent))
    httpd = _Server(("127.0.0.1", 0), handler)  # loopback only
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


@pytest.fixture(autouse=True)
def no_proxy(monkeypatch) -> None:
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")


def test_url(server, files) -> None:
    assert torch.equal(load_audio(f"{server}/stereo44k.flac"), load_audio(files["flac"]))


def test_url_not_found(server) -> None:
    with pytest.raises(AudioError, match=r"/missing\.wav: HTTP error 404"):
        load_audio(f"{server}/missing.wav")


def test_url_not_audio(server) -> None:
    with pytest.raises(AudioError, match=r"/notes\.wav: could not decode audio"):
        load_audio(f"{server}/notes.wav")


def test_url_size_cap(server, monkeypatch) -> None:
    monkeypatch.setattr(af3.audio, "MAX_DOWNLOAD_BYTES", 1000)
    with pytest.raises(AudioError, match="over the 1000-byte download limit"):
        load_audio(f"{server}/stereo44k.flac")


def test_url_timeout(server, monkeypatch) -> None:
    monkeypatch.setattr(af3.audio, "DOWNLOAD_TIMEOUT_S", 0.2)
    with pytest.raises(AudioError, match=r"slow\.wav: download failed"):
        load_audio(f"{server}/slow.wav")


@pytest.mark.parametrize("url", ["file:///etc/passwd", "ftp://example.com/a.wav", "s3://bucket/a.wav"])
def test_other_schemes_are_refused(url: str) -> None:
    with pytest.raises(AudioError, match="URL scheme .* is not supported"):
        load_audio(url)
