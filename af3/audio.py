"""Audio input: files, URLs, bytes, file objects and arrays -> mono float32 at 16 kHz.

Encoded audio (wav, flac, ogg, mp3, ... whatever libsndfile reads) is decoded with soundfile;
only the first 10 minutes of a long file are decoded, since AF3 never looks further.
"""

from __future__ import annotations

import http.client
import io
import math
import os
import re
import urllib.error
import urllib.parse
import urllib.request
import warnings
from collections.abc import Iterator
from typing import Any, BinaryIO

import numpy as np
import soundfile
import torch
import torchaudio

SAMPLING_RATE = 16_000  # what the model consumes
MAX_SECONDS = 600.0  # 20 windows of 30 s: AF3 ignores anything later
MAX_CHANNELS = 16  # a 2-D array with more "channels" than this is more likely a batch of clips
DOWNLOAD_TIMEOUT_S = 30.0
MAX_DOWNLOAD_BYTES = 256 * 2**20  # 10 minutes of 48 kHz 24-bit stereo WAV is 173 MB
# torchaudio's resampler builds a (new, orig + 2 * width) polyphase filter from the two rates divided by
# their gcd: tiny for 44.1 / 48 / 8 kHz, but billions of elements for a rate such as 44 101 Hz.
MAX_RESAMPLE_FILTER = 2**24  # elements

AudioSource = str | os.PathLike | bytes | bytearray | memoryview | BinaryIO | np.ndarray | torch.Tensor

_URL_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")
# Integer PCM: divide by 2^(bits-1) to land in [-1, 1); 8-bit PCM is unsigned, centred on 128.
_PCM_SCALE = {torch.int8: (0, 128.0), torch.uint8: (128, 128.0), torch.int16: (0, 32768.0),
              torch.int32: (0, 2.0**31)}


class AudioError(ValueError):
    """Audio could not be read, decoded or used."""


def load_audio(source: AudioSource, sampling_rate: int | None = None, *,
               max_seconds: float | None = MAX_SECONDS) -> torch.Tensor:
    """Load `source` as a 1-D float32 tensor of mono samples at 16 kHz.

    `source` is a path, an http(s) URL, encoded bytes, a binary file object, or a numpy array /
    torch tensor of samples (1-D, or 2-D with a channel axis, which is averaged). Arrays are taken
    to be at `sampling_rate` (default 16 kHz); encoded audio carries its own rate, and a
    `sampling_rate` that disagrees with it is an error. Other rates are resampled to 16 kHz.
    Encoded audio longer than `max_seconds` is decoded only that far, with a warning
    (None or inf: decode all of it). Tensors stay on their device; everything else comes back on the CPU.
    """
    if sampling_rate is not None:
        sampling_rate = _check_rate(sampling_rate)
    if max_seconds is not None:
        if isinstance(max_seconds, bool) or not isinstance(max_seconds, (int, float, np.integer, np.floating)):
            raise TypeError(f"max_seconds must be a number or None, got {type(max_seconds).__name__}")
        if not max_seconds > 0:
            raise ValueError(f"max_seconds must be positive or None, got {max_seconds!r}")
        if math.isinf(max_seconds):
            max_seconds = None

    if isinstance(source, (torch.Tensor, np.ndarray)):
        kind = "tensor" if isinstance(source, torch.Tensor) else "array"
        name = f"{kind} of shape {tuple(source.shape)}"
        samples = _to_float(source, name)
        if samples.numel() == 0:  # before _mono, whose mean over an empty axis would be NaN
            raise AudioError(f"{name}: the audio is empty (0 samples)")
        samples = _mono(samples, name)
        return _finish(samples, sampling_rate or SAMPLING_RATE, name)
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
            return _decode(io.BytesIO(_download(text)), text, sampling_rate, max_seconds)
        if not os.path.exists(text):
            raise FileNotFoundError(f"audio file not found: {text}")
        if os.path.isdir(text):
            raise AudioError(f"{text}: is a directory, not an audio file")
        return _decode(text, text, sampling_rate, max_seconds)
    if isinstance(source, (bytes, bytearray, memoryview)):
        data = bytes(source)
        name = f"audio bytes ({len(data)} bytes)"
        if len(data) < 4096 and b"\0" not in data and os.path.isfile(data):  # os.fsencode(path), most likely
            raise TypeError(f"{name} hold the path {os.fsdecode(data)!r}, not audio; pass paths as str, "
                            "bytes as encoded audio")
        return _decode(io.BytesIO(data), name, sampling_rate, max_seconds)
    if isinstance(source, io.TextIOBase):
        raise TypeError(f"file object {getattr(source, 'name', source)!r} is open in text mode; "
                        "open it with 'rb'")
    if hasattr(source, "read"):
        name = f"file object {getattr(source, 'name', type(source).__name__)!r}"
        if getattr(source, "closed", False):
            raise ValueError(f"{name} is closed; pass an open binary file")
        if not (hasattr(source, "seekable") and source.seekable()):
            source = io.BytesIO(_read_capped(source, name))  # soundfile needs to seek
        return _decode(source, name, sampling_rate, max_seconds)
    raise TypeError(f"unsupported audio source of type {type(source).__name__}: pass a path, an http(s) "
                    "URL, bytes, a binary file object, a numpy array or a torch tensor")


def _check_rate(rate: Any) -> int:
    if isinstance(rate, bool) or not isinstance(rate, (int, float, np.integer, np.floating)):
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


def _mono(samples: torch.Tensor, name: str) -> torch.Tensor:
    """Average the channel axis of (channels, samples) or (samples, channels) audio."""
    if samples.ndim == 1:
        return samples
    if samples.ndim != 2:
        raise AudioError(f"{name}: expected 1-D samples or 2-D (channels, samples) audio, "
                         f"got {samples.ndim}-D")
    rows, cols = samples.shape
    if rows == 1 or cols == 1:
        return samples.reshape(-1)
    if rows == cols or min(rows, cols) > MAX_CHANNELS:
        raise AudioError(f"{name}: cannot tell the channel axis (expected (channels, samples) or "
                         f"(samples, channels) with at most {MAX_CHANNELS} channels); pass a 1-D mono "
                         "array, or a list of clips for a batch")
    return samples.mean(dim=0 if rows < cols else 1)


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


def _decode(file: str | BinaryIO, name: str, sampling_rate: int | None,
            max_seconds: float | None) -> torch.Tensor:
    try:
        with soundfile.SoundFile(file) as f:
            rate, total = f.samplerate, f.frames
            keep = total if max_seconds is None else math.ceil(max_seconds * rate)
            truncated = total > keep
            # One extra second gives the resampler its right-hand context at the cut.
            data = f.read(frames=keep + rate if truncated else -1, dtype="float32", always_2d=True)
    except soundfile.SoundFileError as e:
        reason = getattr(e, "error_string", None) or str(e)  # without soundfile's "Error opening <obj>"
        raise AudioError(f"{name}: could not decode audio ({reason.rstrip('.')}); soundfile reads wav, "
                         "flac, ogg and mp3, among others") from None
    if sampling_rate is not None and sampling_rate != rate:
        raise AudioError(f"{name}: sampling_rate={sampling_rate} was given but the file is at {rate} Hz; "
                         "leave sampling_rate unset for encoded audio")
    samples = _finish(torch.from_numpy(data).mean(dim=1), rate, name)  # (frames, channels) -> mono
    if truncated:
        samples = samples[: math.ceil(max_seconds * SAMPLING_RATE)]
        warnings.warn(f"{name}: {total / rate:.1f} s of audio; only the first {max_seconds:g} s are "
                      "decoded (AF3 uses at most 10 minutes)", stacklevel=3)
    return samples


def _read_capped(f: BinaryIO, name: str) -> bytes:
    data = f.read(MAX_DOWNLOAD_BYTES + 1)
    if not isinstance(data, bytes):
        raise TypeError(f"{name}: read() returned {type(data).__name__}, not bytes; open it in binary mode")
    if len(data) > MAX_DOWNLOAD_BYTES:
        raise AudioError(f"{name}: more than {MAX_DOWNLOAD_BYTES} bytes; save it to a file and pass the path")
    return data


def _download(url: str) -> bytes:
    try:
        with urllib.request.urlopen(url, timeout=DOWNLOAD_TIMEOUT_S) as response:
            final = response.geturl()
            if urllib.parse.urlsplit(final).scheme.lower() not in ("http", "https"):
                raise AudioError(f"{url}: redirected to {final}, which is not http(s)")
            length = response.headers.get("Content-Length")
            if length is not None and length.isdigit() and int(length) > MAX_DOWNLOAD_BYTES:
                raise AudioError(f"{url}: {int(length)} bytes is over the {MAX_DOWNLOAD_BYTES}-byte download "
                                 "limit; download it yourself and pass the path")
            data = response.read(MAX_DOWNLOAD_BYTES + 1)
    except urllib.error.HTTPError as e:
        raise AudioError(f"{url}: HTTP error {e.code} ({e.reason})") from None
    except (urllib.error.URLError, OSError, http.client.HTTPException) as e:  # timeouts are OSErrors
        reason = getattr(e, "reason", e)
        raise AudioError(f"{url}: download failed ({reason})") from None
    if len(data) > MAX_DOWNLOAD_BYTES:
        raise AudioError(f"{url}: more than the {MAX_DOWNLOAD_BYTES}-byte download limit; download it "
                         "yourself and pass the path")
    return data


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
    if isinstance(block_seconds, bool) or not isinstance(block_seconds, (int, float)) or not block_seconds > 0:
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
    if f.samplerate != SAMPLING_RATE:
        try:
            _check_resample_filter(f.samplerate, name)
        except AudioError:
            f.close()
            raise
    return _resampled(_decoded_blocks(f, name, max(1, round(block_seconds * f.samplerate))), f.samplerate)


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


def _encoded_file(source: Any) -> tuple[str | BinaryIO, str]:
    """(what soundfile opens, the name errors use) for a path, URL, bytes or binary file object."""
    # The same checks as load_audio's; once its block decoder lands, the two should share this.
    if isinstance(source, (str, os.PathLike)):
        text = os.fspath(source)
        if isinstance(text, bytes):
            raise TypeError(f"path must be str, not bytes: {text!r}")
        match = _URL_SCHEME.match(text)
        if match:
            if match.group(1).lower() not in ("http", "https"):
                raise AudioError(f"{text}: URL scheme {match.group(1).lower()!r} is not supported; use an "
                                 "http(s) URL or a local path")
            return io.BytesIO(_download(text)), text
        if not os.path.exists(text):
            raise FileNotFoundError(f"audio file not found: {text}")
        if os.path.isdir(text):
            raise AudioError(f"{text}: is a directory, not an audio file")
        return text, text
    if isinstance(source, (bytes, bytearray, memoryview)):
        data = bytes(source)
        return io.BytesIO(data), f"audio bytes ({len(data)} bytes)"
    if isinstance(source, io.TextIOBase):
        raise TypeError(f"file object {getattr(source, 'name', source)!r} is open in text mode; open it with 'rb'")
    if hasattr(source, "read"):
        name = f"file object {getattr(source, 'name', type(source).__name__)!r}"
        if getattr(source, "closed", False):
            raise ValueError(f"{name} is closed; pass an open binary file")
        if not (hasattr(source, "seekable") and source.seekable()):
            source = io.BytesIO(_read_capped(source, name))
        return source, name
    raise TypeError(f"unsupported audio source of type {type(source).__name__}: pass a path, an http(s) "
                    "URL, bytes, a binary file object, a numpy array or a torch tensor")


def _decode_error(name: str, e: soundfile.SoundFileError) -> AudioError:
    reason = getattr(e, "error_string", None) or str(e)
    return AudioError(f"{name}: could not decode audio ({reason.rstrip('.')}); soundfile reads wav, "
                      "flac, ogg and mp3, among others")


def _decoded_blocks(f: soundfile.SoundFile, name: str, frames: int) -> Iterator[torch.Tensor]:
    """Mono float32 blocks of `frames` samples at the file's rate, checked as load_audio checks."""
    done = 0
    with f:
        while True:
            try:
                data = f.read(frames, dtype="float32", always_2d=True)  # (frames, channels)
            except (soundfile.SoundFileError, RuntimeError) as e:
                raise AudioError(f"{name}: could not decode audio after {done / f.samplerate:.1f} s ({e})") from None
            if data.shape[0] == 0:
                break
            block = torch.from_numpy(data).mean(dim=1)
            finite = torch.isfinite(block)
            if not bool(finite.all()):
                first = done + int((~finite).nonzero()[0, 0])
                raise AudioError(f"{name}: the audio contains NaN or infinite samples (first at sample {first})")
            done += block.shape[0]
            yield block
    if done == 0:
        raise AudioError(f"{name}: the audio is empty (0 samples)")


def _resampled(blocks: Iterator[torch.Tensor], rate: int) -> Iterator[torch.Tensor]:
    """Resample a stream of blocks at `rate` to 16 kHz as if it were resampled in one piece.

    In lowest terms the rates are orig:new, and output sample k*new + p depends only on input
    within `width` samples of k*orig. So input is resampled in pieces that start at multiples
    of orig, each with `context` samples of the input on either side, keeping only the outputs
    whose inputs were all present. Before the first sample the resampler pads with zeros, as it
    does for the whole file.
    """
    if rate == SAMPLING_RATE:
        yield from blocks
        return
    gcd = math.gcd(rate, SAMPLING_RATE)
    orig, new = rate // gcd, SAMPLING_RATE // gcd
    width = math.ceil(6 * orig / (0.99 * min(orig, new)))  # torchaudio's filter half-width, as above
    context = -(-width // orig) * orig  # a multiple of orig, so pieces stay in phase
    pending = torch.zeros(0)  # input from `left` samples before the next output's input onwards
    left = 0
    for block in blocks:
        pending = torch.cat([pending, block])
        ready = (pending.shape[0] - left - context) // orig * orig  # input whose outputs can be made now
        if ready <= 0:
            continue
        out = torchaudio.functional.resample(pending[:left + ready + context], rate, SAMPLING_RATE)
        yield out[left // orig * new:(left + ready) // orig * new]
        drop = max(0, left + ready - context)
        pending, left = pending[drop:], left + ready - drop
    if pending.shape[0] > left:
        out = torchaudio.functional.resample(pending, rate, SAMPLING_RATE)
        yield out[left // orig * new:]
