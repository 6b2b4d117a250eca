"""Hostile audio: decompression bombs, huge arrays, empty files, slow or redirecting servers.

Memory is measured as the peak resident set of a fresh subprocess (`ru_maxrss`), on bombs small
enough to build in a second but large enough that decoding them whole would show.
"""

from __future__ import annotations

import http.server
import io
import socket
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import soundfile
import torch
import torchaudio

import af3.audio
import af3.processor
from af3.audio import AudioError, load_audio

SR = 16_000
ROOT = Path(__file__).resolve().parents[1]


def noise(n: int, channels: int, seed: int = 0) -> np.ndarray:
    return (np.random.default_rng(seed).standard_normal((n, channels)) * 0.1).astype(np.float32)


def whole_resample(x: np.ndarray, rate: int) -> torch.Tensor:
    """What decoding everything at once gives: downmix, then one resampling of the whole."""
    mono = torch.from_numpy(x).mean(dim=1)
    return mono if rate == SR else torchaudio.functional.resample(mono, rate, SR)


# ---- block decoding --------------------------------------------------------------------------


@pytest.mark.parametrize(("rate", "channels"), [(44_100, 2), (22_050, 3), (48_000, 1), (16_000, 2), (655_350, 1)])
def test_blocks_join_to_whole_file_resampling(rate: int, channels: int, monkeypatch) -> None:
    x = noise(int(2.3 * rate), channels)
    data = io.BytesIO()
    soundfile.write(data, x, rate, format="WAV", subtype="FLOAT")
    reads = []
    original = soundfile.SoundFile.read

    def spy(self, frames=-1, *args, **kwargs):
        out = original(self, frames, *args, **kwargs)
        reads.append(len(out))
        return out

    monkeypatch.setattr(soundfile.SoundFile, "read", spy)
    monkeypatch.setattr(af3.audio, "BLOCK_BYTES", 4 * channels * rate // 5)  # blocks of ~0.2 s
    got = load_audio(data.getvalue())
    assert len([n for n in reads if n]) >= 10  # it really went block by block
    want = whole_resample(x, rate)
    assert got.shape == want.shape
    torch.testing.assert_close(got, want, atol=1e-6, rtol=0)


def test_blocks_of_a_cut_file_match_the_whole_resampled_then_cut(monkeypatch) -> None:
    rate = 44_100
    x = noise(3 * rate, 2)
    data = io.BytesIO()
    soundfile.write(data, x, rate, format="WAV", subtype="FLOAT")
    monkeypatch.setattr(af3.audio, "BLOCK_BYTES", 4 * 2 * rate // 4)
    with pytest.warns(UserWarning, match=r"3\.0 s of audio; only the first 1\.3 s"):
        got = load_audio(data.getvalue(), max_seconds=1.3)
    torch.testing.assert_close(got, whole_resample(x, rate)[: int(1.3 * SR)], atol=1e-6, rtol=0)


def test_resampled_blocks_is_reusable_on_any_reader() -> None:
    rate, x = 44_100, noise(44_100 * 2, 2)
    position = 0

    def read(n: int) -> np.ndarray:
        nonlocal position
        out = x[position: position + min(n, 1000)]  # a reader that returns less than asked
        position += len(out)
        return out

    got = torch.cat(list(af3.audio.resampled_blocks(read, rate, channels=2, name="stream")))
    torch.testing.assert_close(got, whole_resample(x, rate), atol=1e-6, rtol=0)
    bad = x.copy()
    bad[70_000, 1] = np.nan
    position, x = 0, bad
    with pytest.raises(AudioError, match=r"stream: the audio contains NaN or infinite samples \(first at sample 70000\)"):
        list(af3.audio.resampled_blocks(read, rate, channels=2, name="stream"))


# ---- peak memory -----------------------------------------------------------------------------

_MEASURE = textwrap.dedent("""
    import resource, sys, warnings
    import numpy as np, soundfile, torch
    import af3.audio
    def peak_mb():
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    af3.audio.load_audio(np.zeros((48_000, 2)), 48_000)  # warm up the code paths
    {setup}
    before = peak_mb()
    with warnings.catch_warnings(record=True):
        warnings.simplefilter("always")
        out = {call}
    print(peak_mb() - before, out.shape[0], float(out.abs().max()))
""")


def peak_rss_mb(setup: str, call: str) -> tuple[float, int, float]:
    """Extra peak RSS (MB) of `call` in a fresh interpreter, after `setup`; and the result's length, max."""
    code = _MEASURE.format(setup=setup, call=call)
    done = subprocess.run([sys.executable, "-c", code], check=False, capture_output=True, text=True, timeout=120,
                          cwd=ROOT, env={"PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "PATH": ""})
    assert done.returncode == 0, done.stderr
    mb, n, peak = done.stdout.split()
    return float(mb), int(n), float(peak)


def test_flac_bomb_decodes_in_bounded_memory(tmp_path) -> None:
    # 60 s of silence, 8 channels at 96 kHz: a 46 kB FLAC that is 184 MB as float32 samples (the
    # issue's 600 s x 192 kHz one is 3.7 GB, the same shape ten times over).
    path = tmp_path / "bomb.flac"
    with soundfile.SoundFile(path, "w", samplerate=96_000, channels=8, format="FLAC") as f:
        block = np.zeros((96_000, 8), dtype=np.int16)
        for _ in range(60):
            f.write(block)
    assert path.stat().st_size < 200_000
    mb, n, peak = peak_rss_mb("", f"af3.audio.load_audio({str(path)!r})")
    assert (n, peak) == (60 * SR, 0.0)
    # Decoded whole, it peaked at 316 MB more here; block by block, 121 MB (one 32 MiB block, its
    # by-products and the 3.8 MB result).
    assert mb < 170, f"decoding the bomb took {mb:.0f} MB more"


def test_long_array_is_cut_before_it_is_converted() -> None:
    # 100 s of 48 kHz stereo float64 (77 MB); only 10 s are kept.
    setup = "x = np.random.default_rng(0).standard_normal((2, 4_800_000)) * 0.1"
    mb, n, _ = peak_rss_mb(setup, "af3.audio.load_audio(x, 48_000, max_seconds=10)")
    assert n == 10 * SR
    # Converting all of it first (float32 copy, mean, resampling) took ~100 MB more here.
    assert mb < 30, f"cutting the array took {mb:.0f} MB more"


def test_long_array_cut_matches_the_whole_resampled_then_cut() -> None:
    x = noise(5 * 44_100, 2).T.astype(np.float64)  # (channels, samples), float64
    with pytest.warns(UserWarning, match=r"array of shape \(2, 220500\): 5\.0 s of audio; only the first 2 s"):
        got = load_audio(x, 44_100, max_seconds=2)
    whole = torchaudio.functional.resample(torch.from_numpy(x).float().mean(dim=0), 44_100, SR)
    torch.testing.assert_close(got, whole[: 2 * SR], atol=1e-6, rtol=0)
    assert load_audio(x, 44_100, max_seconds=None).shape == whole.shape


# ---- small things: empty files, where the warning points -------------------------------------


def test_empty_file_says_so(tmp_path) -> None:
    empty = tmp_path / "empty.wav"
    empty.write_bytes(b"")
    with pytest.raises(AudioError, match=r"empty\.wav: empty file \(0 bytes\)"):
        load_audio(empty)
    with pytest.raises(AudioError, match=r"audio bytes \(0 bytes\): empty file"):
        load_audio(b"")
    with open(empty, "rb") as f, pytest.raises(AudioError, match=r"empty file \(0 bytes\)"):
        load_audio(f)


def test_truncation_warning_points_at_the_callers_line(tmp_path) -> None:
    path = tmp_path / "long.flac"  # just over 10 minutes, for the processor's default limit
    soundfile.write(path, np.zeros(601 * 8000, np.int16), 8000)
    with pytest.warns(UserWarning, match=r"long\.flac: 601\.0 s of audio; only the first 1 s") as record:
        load_audio(path, max_seconds=1)
    assert record[0].filename == __file__
    with pytest.warns(UserWarning, match=r"array of shape \(48000,\): 3\.0 s of audio") as record:
        load_audio(np.zeros(3 * SR, np.float32), max_seconds=1)
    assert record[0].filename == __file__
    # af3 calling load_audio from inside af3: still the user's line, not af3's.
    with pytest.warns(UserWarning, match=r"601\.0 s of audio; only the first 600 s") as record:
        af3.processor._load(path, None, "sample 0")
    assert record[0].filename == __file__


# ---- downloads -------------------------------------------------------------------------------


class _Trickle(http.server.BaseHTTPRequestHandler):
    """Serves a byte every 0.2 s: in the body (/body) or already in the headers (/headers)."""

    def do_GET(self) -> None:
        try:
            if self.path == "/headers":
                for c in b"HTTP/1.1 200 OK\r\nX-Slow: " + b"a" * 1000:
                    self.wfile.write(bytes([c]))
                    self.wfile.flush()
                    time.sleep(0.2)
            self.send_response(200)
            self.send_header("Content-Length", "1000")
            self.end_headers()
            for _ in range(1000):
                self.wfile.write(b"\0")
                self.wfile.flush()
                time.sleep(0.2)
        except OSError:
            pass  # the client hung up, as it should

    def log_message(self, *args) -> None:
        pass


class _Redirect(http.server.BaseHTTPRequestHandler):
    target = ""

    def do_GET(self) -> None:
        self.send_response(302)
        self.send_header("Location", self.target)
        self.end_headers()

    def log_message(self, *args) -> None:
        pass


def _serve(handler) -> tuple[http.server.ThreadingHTTPServer, str]:
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)  # loopback only
    httpd.daemon_threads = True
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    return httpd, f"http://127.0.0.1:{httpd.server_address[1]}"


@pytest.fixture(autouse=True)
def no_proxy(monkeypatch) -> None:
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")


@pytest.mark.parametrize("where", ["body", "headers"])
def test_a_trickling_server_is_cut_off_at_the_deadline(where: str) -> None:
    httpd, url = _serve(_Trickle)
    try:
        start = time.monotonic()
        with pytest.raises(AudioError, match=rf"/{where}: the download took longer than 1 s \(download_deadline\)"):
            load_audio(f"{url}/{where}", download_deadline=1)
        assert time.monotonic() - start < 30  # trickled to the end, either would take 200 s or more
    finally:
        httpd.shutdown()
        httpd.server_close()


def test_deadline_is_checked() -> None:
    with pytest.raises(ValueError, match="download_deadline must be a positive number of seconds, got 0"):
        load_audio("http://127.0.0.1:9/a.wav", download_deadline=0)
    assert af3.audio.DOWNLOAD_DEADLINE_S == 300


def test_a_redirect_to_ftp_is_refused_before_it_is_followed() -> None:
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    listener.settimeout(0.5)
    _Redirect.target = f"ftp://127.0.0.1:{listener.getsockname()[1]}/a.wav"
    httpd, url = _serve(_Redirect)
    try:
        with pytest.raises(AudioError, match=r"/a\.wav: redirected to ftp://127\.0\.0\.1:\d+/a\.wav, which is not "
                                             r"http\(s\); not followed"):
            load_audio(f"{url}/a.wav")
        with pytest.raises(TimeoutError):  # nobody connected to the ftp address
            listener.accept()
    finally:
        httpd.shutdown()
        httpd.server_close()
        listener.close()
