"""Audio input: files, URLs, bytes, file objects and arrays -> mono float32 at 16 kHz.

Encoded audio (wav, flac, ogg, mp3, ... whatever libsndfile reads) is decoded with soundfile;
only the first 10 minutes of a long file are decoded, since AF3 never looks further. Decoding goes
block by block (`resampled_blocks`: read, downmix, resample, with the resampler's context carried
across blocks), so memory holds one block plus the 16 kHz result, whatever rate and channel count
the file's header claims: a small FLAC of silence at 192 kHz x 8 channels cannot expand to
gigabytes. Arrays are cut to `max_seconds` (plus the resampler's context) before they are
converted. Downloads are bounded in bytes and in total time, and every redirect is checked.
"""

from __future__ import annotations

import contextlib
import http.client
import io
import math
import os
import re
import socket
import sys
import threading
import urllib.error
import urllib.parse
import urllib.request
import warnings
from collections.abc import Callable, Iterator
from typing import Any, BinaryIO

import numpy as np
import soundfile
import torch
import torchaudio

from af3.config import is_real
from af3.frontend import MAX_SECONDS, SAMPLING_RATE

MAX_CHANNELS = 16  # a 2-D array with more "channels" than this is more likely a batch of clips
DOWNLOAD_TIMEOUT_S = 30.0  # per connection attempt and per read
DOWNLOAD_DEADLINE_S = 300.0  # the whole download: a server trickling bytes cannot hold a caller longer
MAX_DOWNLOAD_BYTES = 256 * 2**20  # 10 minutes of 48 kHz 24-bit stereo WAV is 173 MB
# torchaudio's resampler builds a (new, orig + 2 * width) polyphase filter from the two rates divided by
# their gcd: tiny for 44.1 / 48 / 8 kHz, but billions of elements for a rate such as 44 101 Hz.
MAX_RESAMPLE_FILTER = 2**24  # elements
BLOCK_BYTES = 2**25  # float32 samples (all channels) decoded at a time: 32 MiB, ~87 s of 48 kHz stereo

AudioSource = str | os.PathLike | bytes | bytearray | memoryview | BinaryIO | np.ndarray | torch.Tensor

_URL_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")
# Integer PCM: divide by 2^(bits-1) to land in [-1, 1); 8-bit PCM is unsigned, centred on 128.
_PCM_SCALE = {torch.int8: (0, 128.0), torch.uint8: (128, 128.0), torch.int16: (0, 32768.0),
              torch.int32: (0, 2.0**31)}


class AudioError(ValueError):
    """Audio could not be read, decoded or used."""


def load_audio(source: AudioSource, sampling_rate: int | None = None, *,
               max_seconds: float | None = MAX_SECONDS,
               download_deadline: float = DOWNLOAD_DEADLINE_S) -> torch.Tensor:
    """Load `source` as a 1-D float32 tensor of mono samples at 16 kHz.

    `source` is a path, an http(s) URL, encoded bytes, a binary file object, or a numpy array /
    torch tensor of samples (1-D, or 2-D with a channel axis, which is averaged). Arrays are taken
    to be at `sampling_rate` (default 16 kHz); encoded audio carries its own rate, and a
    `sampling_rate` that disagrees with it is an error. Other rates are resampled to 16 kHz.
    Audio longer than `max_seconds` (files and arrays alike) is decoded and resampled only that
    far, with a warning (None or inf: all of it). Tensors stay on their device; everything else
    comes back on the CPU. A URL is downloaded in at most `download_deadline` seconds (all of it,
    redirects included) and MAX_DOWNLOAD_BYTES bytes; a redirect to anything but http(s) is refused
    before it is followed.
    """
    if sampling_rate is not None:
        sampling_rate = _check_rate(sampling_rate)
    if not is_real(download_deadline) or not download_deadline > 0:
        raise ValueError(f"download_deadline must be a positive number of seconds, got {download_deadline!r}")
    if max_seconds is not None:
        if not is_real(max_seconds):
            raise TypeError(f"max_seconds must be a number or None, got {type(max_seconds).__name__}")
        if not max_seconds > 0:
            raise ValueError(f"max_seconds must be positive or None, got {max_seconds!r}")
        if math.isinf(max_seconds):
            max_seconds = None

    if isinstance(source, (torch.Tensor, np.ndarray)):
        kind = "tensor" if isinstance(source, torch.Tensor) else "array"
        name = f"{kind} of shape {tuple(source.shape)}"
        if 0 in source.shape:  # before _mono, whose mean over an empty axis would be NaN
            raise AudioError(f"{name}: the audio is empty (0 samples)")
        return _load_array(source, sampling_rate or SAMPLING_RATE, name, max_seconds)
    file, name = _encoded_file(source, download_deadline)
    return _decode(file, name, sampling_rate, max_seconds)


def _check_rate(rate: Any) -> int:
    if not is_real(rate):
        raise TypeError(f"sampling_rate must be a number, got {type(rate).__name__}")
    if not (rate > 0 and float(rate).is_integer()):
        raise ValueError(f"sampling_rate must be a positive whole number of Hz, got {rate!r}")
    return int(rate)


def _to_float(samples: np.ndarray | torch.Tensor, name: str) -> torch.Tensor:
    """Samples as a float32 tensor; integer PCM scaled to [-1, 1]."""
    if isinstance(samples, np.ndarray):
        if samples.dtype.kind not in "fiu":
            raise TypeError(f"{name}: samples of dtype {samples.dtype} are not audio; "
                            "use float32 in [-1, 1] or int16/int32 PCM")
        # torch.from_numpy wants native byte order and no negative strides.
        samples = torch.from_numpy(np.asarray(samples, dtype=samples.dtype.newbyteorder("="), order="C"))
    if samples.is_floating_point():
        return samples.to(torch.float32)
    if samples.dtype not in _PCM_SCALE:
        raise TypeError(f"{name}: samples of dtype {samples.dtype} are ambiguous; use float32 in "
                        "[-1, 1] or int8/uint8/int16/int32 PCM")
    offset, scale = _PCM_SCALE[samples.dtype]
    return (samples.to(torch.float32) - offset) / scale


def _load_array(source: np.ndarray | torch.Tensor, rate: int, name: str,
                max_seconds: float | None) -> torch.Tensor:
    """Cut (a view, no copy), then convert, downmix and resample: a 2-hour float64 array costs
    what its first 10 minutes cost."""
    time_axis = _time_axis(tuple(source.shape), name)
    total = source.shape[time_axis]
    keep = total if max_seconds is None else math.ceil(max_seconds * rate)
    truncated = total > keep
    if truncated:
        # The resampler's right-hand context at the cut, so the kept part is what resampling the whole gives.
        end = keep + _resample_context(rate, name)
        source = source[:end] if time_axis == 0 else source[:, :end]
    samples = _finish(_mono(_to_float(source, name), time_axis), rate, name)
    if truncated:
        samples = samples[: math.ceil(max_seconds * SAMPLING_RATE)]
        _warn_truncated(name, total / rate, max_seconds)
    return samples


def _time_axis(shape: tuple[int, ...], name: str) -> int:
    """Which axis of 1-D, (channels, samples) or (samples, channels) audio holds the samples."""
    if len(shape) == 1:
        return 0
    if len(shape) != 2:
        raise AudioError(f"{name}: expected 1-D samples or 2-D (channels, samples) audio, got {len(shape)}-D")
    rows, cols = shape
    if rows == 1 or cols == 1:
        return 0 if cols == 1 else 1
    if rows == cols or min(rows, cols) > MAX_CHANNELS:
        raise AudioError(f"{name}: cannot tell the channel axis (expected (channels, samples) or "
                         f"(samples, channels) with at most {MAX_CHANNELS} channels); pass a 1-D mono "
                         "array, or a list of clips for a batch")
    return 1 if rows < cols else 0


def _mono(samples: torch.Tensor, time_axis: int) -> torch.Tensor:
    """Average the channel axis (the one that is not `time_axis`) of 2-D audio."""
    if samples.ndim == 1:
        return samples
    return samples.mean(dim=1 - time_axis)


def _finish(samples: torch.Tensor, rate: int, name: str) -> torch.Tensor:
    """Check for empty or non-finite audio, then resample to 16 kHz."""
    if samples.numel() == 0:
        raise AudioError(f"{name}: the audio is empty (0 samples)")
    finite = torch.isfinite(samples)
    if not bool(finite.all()):
        first = int((~finite).nonzero()[0, 0])
        raise AudioError(f"{name}: the audio contains NaN or infinite samples (first at sample {first})")
    if rate != SAMPLING_RATE:
        _check_resample_filter(rate, name)
        samples = torchaudio.functional.resample(samples, rate, SAMPLING_RATE)
    return samples.contiguous()


def _check_resample_filter(rate: int, name: str) -> None:
    """Refuse a rate whose resampling filter (as torchaudio builds it) would not fit in memory."""
    gcd = math.gcd(rate, SAMPLING_RATE)
    orig, new = rate // gcd, SAMPLING_RATE // gcd
    width = math.ceil(6 * orig / (0.99 * min(orig, new)))  # torchaudio's defaults: 6 zero crossings, rolloff 0.99
    size = new * (orig + 2 * width)
    if size > MAX_RESAMPLE_FILTER:
        raise AudioError(f"{name}: cannot resample {rate} Hz to {SAMPLING_RATE} Hz: the rates share only a "
                         f"factor of {gcd}, so the resampling filter would hold {size:,} values; check the "
                         "sampling rate, or resample the audio to a standard rate (16000, 44100, 48000 Hz) first")


def _resample_context(rate: int, name: str) -> int:
    """Input samples the resampler reads beyond an output position (either side), rounded up to
    whole periods of the rate ratio, so that blocks cut there line up with output samples."""
    if rate == SAMPLING_RATE:
        return 0
    _check_resample_filter(rate, name)
    gcd = math.gcd(rate, SAMPLING_RATE)
    orig, new = rate // gcd, SAMPLING_RATE // gcd
    width = math.ceil(6 * orig / (0.99 * min(orig, new)))  # as in _check_resample_filter
    return orig * math.ceil((width + orig) / orig)  # torchaudio's kernel spans [-width, width + orig)


def resampled_blocks(read: Callable[[int], np.ndarray], rate: int, channels: int,
                     name: str = "audio", block_frames: int | None = None) -> Iterator[torch.Tensor]:
    """Decode audio block by block: yields 1-D float32 tensors of mono 16 kHz samples.

    `read(n)` returns the next at most n frames as a (frames, channels) float32 array, and an
    empty one at the end (`soundfile.SoundFile.read` with `always_2d=True` is one). Each block
    is downmixed and resampled with the resampler's context on both sides taken from its
    neighbours, so the blocks joined are what resampling the whole recording at once gives (to
    float32 rounding), while memory holds about BLOCK_BYTES of input, whatever the length, rate
    or channel count (or `block_frames` input frames per block, when given). NaN or infinite
    samples are an AudioError naming `name`.
    """
    rate = _check_rate(rate)
    context = _resample_context(rate, name)
    gcd = math.gcd(rate, SAMPLING_RATE)
    period, new = rate // gcd, SAMPLING_RATE // gcd  # `period` input samples make `new` output samples
    frames = BLOCK_BYTES // (4 * channels) if block_frames is None else block_frames
    step = max(period, frames // period * period)  # input frames per block, whole periods
    resampler = torchaudio.transforms.Resample(rate, SAMPLING_RATE, dtype=torch.float32) if rate != SAMPLING_RATE else None
    pending = torch.empty(0)  # mono input from `left` samples (the left context) before the next block
    left, seen, at_end = 0, 0, False
    while not at_end:
        while not at_end and len(pending) < left + step + context:  # the block and its right context
            data = read(step)
            at_end = len(data) == 0
            if not at_end:
                mono = torch.from_numpy(data).mean(dim=1)  # (frames, channels) -> (frames,)
                finite = torch.isfinite(mono)
                if not bool(finite.all()):
                    first = seen + int((~finite).nonzero()[0, 0])
                    raise AudioError(f"{name}: the audio contains NaN or infinite samples (first at sample {first})")
                seen += len(mono)
                pending = torch.cat([pending, mono]) if len(pending) else mono
        if len(pending) <= left:
            break
        if resampler is None:
            out, pending = (pending, pending[:0]) if at_end else (pending[:step], pending[step:])
        else:
            # At the end the rest is one piece, zero-padded on the right as the whole would be.
            chunk = pending if at_end else pending[: left + step + context]
            out = resampler(chunk)[left // period * new: None if at_end else (left + step) // period * new]
            keep_from = max(0, left + step - context)
            pending, left = pending[keep_from:], left + step - keep_from
        yield out.contiguous()


def _decode(file: str | BinaryIO, name: str, sampling_rate: int | None,
            max_seconds: float | None) -> torch.Tensor:
    try:
        with soundfile.SoundFile(file) as f:
            rate, total, channels = f.samplerate, f.frames, f.channels
            if sampling_rate is not None and sampling_rate != rate:
                raise AudioError(f"{name}: sampling_rate={sampling_rate} was given but the file is at {rate} "
                                 "Hz; leave sampling_rate unset for encoded audio")
            # Only what can be used is read (plus the resampler's context at the cut), whatever the header says.
            keep = total if max_seconds is None else math.ceil(max_seconds * rate)
            truncated = total > keep
            remaining = keep + _resample_context(rate, name) if truncated else total

            def read(n: int) -> np.ndarray:
                nonlocal remaining
                data = f.read(frames=min(n, remaining), dtype="float32", always_2d=True)
                remaining -= len(data)
                return data

            blocks = list(resampled_blocks(read, rate, channels, name))
    except soundfile.SoundFileError as e:
        if _is_empty(file):
            raise AudioError(f"{name}: empty file (0 bytes); there is no audio in it") from None
        raise _decode_error(name, e) from None
    if not blocks:
        raise AudioError(f"{name}: the audio is empty (0 samples)")
    samples = blocks[0] if len(blocks) == 1 else torch.cat(blocks)
    if truncated:
        samples = samples[: math.ceil(max_seconds * SAMPLING_RATE)]
        _warn_truncated(name, total / rate, max_seconds)
    return samples


def _is_empty(file: str | BinaryIO) -> bool:
    if isinstance(file, str):
        return os.path.getsize(file) == 0
    try:
        return file.seek(0, io.SEEK_END) == 0
    except (OSError, ValueError):
        return False


def _warn_truncated(name: str, seconds: float, max_seconds: float) -> None:
    """The warning, attributed to the first caller outside af3 (where the user can act on it)."""
    frame, level = sys._getframe(1), 2  # the caller of this function is stack level 2
    package = os.path.dirname(os.path.abspath(__file__))
    while frame is not None and os.path.dirname(os.path.abspath(frame.f_code.co_filename)) == package:
        frame, level = frame.f_back, level + 1
    warnings.warn(f"{name}: {seconds:.1f} s of audio; only the first {max_seconds:g} s are decoded "
                  "(AF3 uses at most 10 minutes)", stacklevel=level)


def _read_capped(f: BinaryIO, name: str) -> bytes:
    data = f.read(MAX_DOWNLOAD_BYTES + 1)
    if not isinstance(data, bytes):
        raise TypeError(f"{name}: read() returned {type(data).__name__}, not bytes; open it in binary mode")
    if len(data) > MAX_DOWNLOAD_BYTES:
        raise AudioError(f"{name}: more than {MAX_DOWNLOAD_BYTES} bytes; save it to a file and pass the path")
    return data


def _download(url: str, deadline_s: float = DOWNLOAD_DEADLINE_S) -> bytes:
    """GET `url`: at most MAX_DOWNLOAD_BYTES bytes, in at most `deadline_s` seconds overall."""
    deadline = _Deadline(deadline_s)
    opener = urllib.request.build_opener(_CheckedRedirects, deadline.handler(urllib.request.HTTPHandler),
                                         deadline.handler(urllib.request.HTTPSHandler))
    try:
        with deadline, opener.open(url, timeout=min(DOWNLOAD_TIMEOUT_S, deadline_s)) as response:
            length = response.headers.get("Content-Length")
            if length is not None and length.isdigit() and int(length) > MAX_DOWNLOAD_BYTES:
                raise AudioError(f"{url}: {int(length)} bytes is over the {MAX_DOWNLOAD_BYTES}-byte download "
                                 "limit; download it yourself and pass the path")
            data = response.read(MAX_DOWNLOAD_BYTES + 1)
    except urllib.error.HTTPError as e:
        raise AudioError(f"{url}: HTTP error {e.code} ({e.reason})") from None
    except (urllib.error.URLError, OSError, http.client.HTTPException) as e:  # timeouts are OSErrors
        if deadline.expired:
            raise deadline.error(url) from None
        reason = getattr(e, "reason", e)
        raise AudioError(f"{url}: download failed ({reason})") from None
    if deadline.expired:  # the connection was cut at the deadline: what arrived is incomplete
        raise deadline.error(url)
    if len(data) > MAX_DOWNLOAD_BYTES:
        raise AudioError(f"{url}: more than the {MAX_DOWNLOAD_BYTES}-byte download limit; download it "
                         "yourself and pass the path")
    return data


class _CheckedRedirects(urllib.request.HTTPRedirectHandler):
    """Follows a redirect only to http(s): urllib itself would open an ftp:// one."""

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        if urllib.parse.urlsplit(newurl).scheme.lower() not in ("http", "https"):
            raise AudioError(f"{req.full_url}: redirected to {newurl}, which is not http(s); not followed")
        return super().redirect_request(req, fp, code, msg, headers, newurl)


class _Deadline:
    """An overall time limit for a download. Socket timeouts bound each read, not the total: a
    server sending a byte a second never trips them. When the time is up, a watchdog thread shuts
    down every socket the download opened (and any it opens later), so the blocked read returns."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.expired = False
        self._sockets: list[socket.socket] = []
        self._done = threading.Event()

    def handler(self, base: type[urllib.request.AbstractHTTPHandler]) -> urllib.request.BaseHandler:
        """`base` (urllib's HTTP or HTTPS handler), recording the socket of each connection it makes."""
        sockets = self._sockets

        def recording(http_class):
            def make(*args, **kwargs):
                conn = http_class(*args, **kwargs)
                connect = conn.connect

                def connect_and_record() -> None:
                    connect()
                    sockets.append(conn.sock)  # urllib drops conn.sock later; the response reads through it
                conn.connect = connect_and_record
                return conn
            return make

        class Recording(base):
            def do_open(self, http_class, req, **kwargs):
                return super().do_open(recording(http_class), req, **kwargs)

        return Recording()

    def __enter__(self) -> None:
        threading.Thread(target=self._watch, daemon=True, name="af3-download-deadline").start()

    def __exit__(self, *exc: object) -> None:
        self._done.set()

    def _watch(self) -> None:
        if self._done.wait(self.seconds):
            return
        self.expired = True
        while True:  # until the download gives up: a connection may still be opening
            for sock in list(self._sockets):
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
            if self._done.wait(0.1):
                return

    def error(self, url: str) -> AudioError:
        return AudioError(f"{url}: the download took longer than {self.seconds:g} s (download_deadline) and "
                          "was stopped; download it yourself and pass the path, or raise download_deadline")


# ---- recordings of any length: streamed in blocks ------------------------------------------------
# load_audio stops at 10 minutes because AF3 does; long-form transcription (af3/longform.py) walks a
# whole recording instead, a block at a time, so memory holds one block however long the file is.

BLOCK_SECONDS = 60.0  # decoded per read: 3.8 MB of float32 at 16 kHz


def iter_audio(source: AudioSource, block_seconds: float = BLOCK_SECONDS, *,
               sampling_rate: int | None = None) -> Iterator[torch.Tensor]:
    """Yield all of `source` as consecutive 1-D float32 blocks of mono 16 kHz samples.

    Takes what `load_audio` takes, with no length limit. Encoded audio is decoded `block_seconds`
    at a time and resampled with context across block edges, so the joined blocks equal the
    whole file resampled at once (to float rounding). The source is opened here, so a missing
    or undecodable file fails at the call; a file corrupt further in fails at that block.
    """
    if not is_real(block_seconds) or not block_seconds > 0:
        raise ValueError(f"block_seconds must be a positive number, got {block_seconds!r}")
    if sampling_rate is not None:
        sampling_rate = _check_rate(sampling_rate)
    if isinstance(source, (torch.Tensor, np.ndarray)):  # already in memory: slice it
        samples = load_audio(source, sampling_rate, max_seconds=None)
        step = max(1, round(block_seconds * SAMPLING_RATE))
        return (samples[i:i + step] for i in range(0, samples.shape[0], step))
    file, name = _encoded_file(source)
    try:
        f = soundfile.SoundFile(file)
    except soundfile.SoundFileError as e:
        raise _decode_error(name, e) from None
    if sampling_rate is not None and sampling_rate != f.samplerate:
        f.close()
        raise AudioError(f"{name}: sampling_rate={sampling_rate} was given but the file is at {f.samplerate} Hz; "
                         "leave sampling_rate unset for encoded audio")
    try:
        _resample_context(f.samplerate, name)  # a rate whose filter cannot be built fails at the call
    except AudioError:
        f.close()
        raise
    return _stream_file(f, name, max(1, round(block_seconds * f.samplerate)))

def audio_seconds(source: AudioSource, sampling_rate: int | None = None) -> float | None:
    """The length of `source` in seconds, from the file header where it is encoded (nothing is decoded).

    None for URLs (finding out would mean downloading). Errors as `load_audio`'s for a missing or
    undecodable file.
    """
    if isinstance(source, (torch.Tensor, np.ndarray)):
        n = source.shape[-1] if source.ndim == 1 or source.shape[0] <= source.shape[-1] else source.shape[0]
        return n / (sampling_rate or SAMPLING_RATE)
    if isinstance(source, (str, os.PathLike)) and _URL_SCHEME.match(os.fspath(source)):
        return None
    file, name = _encoded_file(source)
    position = file.tell() if hasattr(file, "tell") else None
    try:
        with soundfile.SoundFile(file) as f:
            return f.frames / f.samplerate
    except soundfile.SoundFileError as e:
        raise _decode_error(name, e) from None
    finally:
        if position is not None:
            file.seek(position)  # a caller's file object is read again later


def _encoded_file(source: Any, download_deadline: float = DOWNLOAD_DEADLINE_S) -> tuple[str | BinaryIO, str]:
    """(what soundfile opens, the name errors use) for a path, URL, bytes or binary file object;
    load_audio and iter_audio both take their encoded sources through here."""
    if isinstance(source, (str, os.PathLike)):
        text = os.fspath(source)
        if isinstance(text, bytes):
            raise TypeError(f"path must be str, not bytes: {text!r}")
        match = _URL_SCHEME.match(text)
        if match:
            scheme = match.group(1).lower()
            if scheme not in ("http", "https"):
                raise AudioError(f"{text}: URL scheme {scheme!r} is not supported; use an http(s) URL "
                                 "or a local path")
            return io.BytesIO(_download(text, download_deadline)), text
        if not os.path.exists(text):
            raise FileNotFoundError(f"audio file not found: {text}")
        if os.path.isdir(text):
            raise AudioError(f"{text}: is a directory, not an audio file")
        return text, text
    if isinstance(source, (bytes, bytearray, memoryview)):
        data = bytes(source)
        name = f"audio bytes ({len(data)} bytes)"
        if len(data) < 4096 and b"\0" not in data and os.path.isfile(data):  # os.fsencode(path), most likely
            raise TypeError(f"{name} hold the path {os.fsdecode(data)!r}, not audio; pass paths as str, "
                            "bytes as encoded audio")
        return io.BytesIO(data), name
    if isinstance(source, io.TextIOBase):
        raise TypeError(f"file object {getattr(source, 'name', source)!r} is open in text mode; "
                        "open it with 'rb'")
    if hasattr(source, "read"):
        name = f"file object {getattr(source, 'name', type(source).__name__)!r}"
        if getattr(source, "closed", False):
            raise ValueError(f"{name} is closed; pass an open binary file")
        if not (hasattr(source, "seekable") and source.seekable()):
            source = io.BytesIO(_read_capped(source, name))  # soundfile needs to seek
        return source, name
    raise TypeError(f"unsupported audio source of type {type(source).__name__}: pass a path, an http(s) "
                    "URL, bytes, a binary file object, a numpy array or a torch tensor")


def _decode_error(name: str, e: soundfile.SoundFileError) -> AudioError:
    reason = getattr(e, "error_string", None) or str(e)  # without soundfile's "Error opening <obj>"
    return AudioError(f"{name}: could not decode audio ({reason.rstrip('.')}); soundfile reads wav, "
                      "flac, ogg and mp3, among others")


def _stream_file(f: soundfile.SoundFile, name: str, frames: int) -> Iterator[torch.Tensor]:
    """`f` decoded `frames` at a time through `resampled_blocks`; a file corrupt further in fails
    at that block, naming how far decoding got."""
    done = 0

    def read(n: int) -> np.ndarray:
        nonlocal done
        try:
            data = f.read(n, dtype="float32", always_2d=True)  # (frames, channels)
        except (soundfile.SoundFileError, RuntimeError) as e:
            raise AudioError(f"{name}: could not decode audio after {done / f.samplerate:.1f} s ({e})") from None
        done += len(data)
        return data

    with f:
        yield from resampled_blocks(read, f.samplerate, f.channels, name, block_frames=frames)
    if done == 0:
        raise AudioError(f"{name}: the audio is empty (0 samples)")
