"""Log-mel frontend: 16 kHz windows -> Whisper log-mel features (n_windows, 128, 3000) and their mask.

Per window, as Whisper and HF's WhisperFeatureExtractor do it (sizes from af3.frontend):
zero-pad to 30 s; centred STFT (reflect padding, periodic Hann, n_fft 400, hop 160), last frame
dropped -> 3000 frames; power spectrum through a slaney mel filterbank (0-8 kHz, float64-built);
log10(max(mel, 1e-10)); floor at (window max - 8); (x + 4) / 4.
The mask marks the first ceil(n_samples_in_window / 160) frames of each window as real audio.
"""

from __future__ import annotations

import functools
import math
import warnings
from dataclasses import dataclass

import torch

from af3.config import is_int
from af3.frontend import (
    CHUNK_LENGTH,
    HOP_LENGTH,
    MAX_SAMPLES,
    MAX_SECONDS,
    MAX_WINDOWS,
    N_FFT,
    N_FRAMES,
    N_MELS,
    N_SAMPLES,
    SAMPLING_RATE,
)
from af3.windows import mel_length, window_ranges, window_token_count

MASK_DTYPE = torch.int32  # what HF's processor returns for input_features_mask


@dataclass
class AudioFeatures:
    """The frontend's output for a batch of clips."""

    input_features: torch.Tensor  # (total_windows, n_mels, N_FRAMES) float32
    input_features_mask: torch.Tensor  # (total_windows, N_FRAMES) int32, 1 = real audio
    windows_per_clip: list[int]  # clip i owns the next windows_per_clip[i] rows
    tokens_per_clip: list[int]  # <sound> tokens each clip expands to


def _hz_to_mel(f: torch.Tensor) -> torch.Tensor:
    """Slaney's mel scale: linear below 1 kHz, logarithmic above."""
    logstep = math.log(6.4) / 27.0
    return torch.where(f < 1000.0, 3.0 * f / 200.0, 15.0 + torch.log(f / 1000.0) / logstep)


def _mel_to_hz(m: torch.Tensor) -> torch.Tensor:
    logstep = math.log(6.4) / 27.0
    return torch.where(m < 15.0, 200.0 * m / 3.0, 1000.0 * torch.exp(logstep * (m - 15.0)))


def mel_filters(n_fft: int, n_mels: int, sampling_rate: int) -> torch.Tensor:
    """Slaney-normalised triangular filters on the slaney mel scale, 0 Hz to Nyquist, (n_freqs, n_mels) float64.

    The same filterbank as `torchaudio.functional.melscale_fbanks(..., norm="slaney", mel_scale="slaney")`
    (the tests check it), built in float64 as librosa and Whisper build it: torchaudio builds it in
    float32, whose error on the small weights at a triangle's edge (up to 0.3 %) moves the log-mel of a
    pure tone by more than 1e-4.
    """
    freqs = torch.linspace(0, sampling_rate // 2, n_fft // 2 + 1, dtype=torch.float64)  # (n_freqs,)
    m_max = _hz_to_mel(torch.tensor(sampling_rate / 2, dtype=torch.float64))
    edges = _mel_to_hz(torch.linspace(0.0, float(m_max), n_mels + 2, dtype=torch.float64))  # (n_mels + 2,)
    width = edges[1:] - edges[:-1]  # (n_mels + 1,)
    slopes = edges[None, :] - freqs[:, None]  # (n_freqs, n_mels + 2)
    rising = -slopes[:, :-2] / width[:-1]  # (n_freqs, n_mels)
    falling = slopes[:, 2:] / width[1:]  # (n_freqs, n_mels)
    fb = torch.clamp(torch.minimum(rising, falling), min=0.0)
    return fb * (2.0 / (edges[2:] - edges[:-2]))  # slaney norm: equal area per filter


# The filterbank is cut into bands of this many consecutive filters; each band is multiplied only
# with the frequency rows where one of its filters is non-zero (about 7 % of the dense matmul).
_MELS_PER_BAND = 8
# On the CPU one window at a time: its ~12 MB of intermediates are reused from window to window and
# stay in cache instead of page-faulting fresh buffers. All 20 at once measured 2-3x slower; 1, 2 and
# 4 were within the noise of a loaded machine.
_CPU_WINDOWS_PER_PASS = 1


@dataclass(frozen=True)
class _MelBand:
    """Filters first..last-1 of the filterbank, non-zero only on frequency rows lo..hi-1."""

    first: int
    last: int
    lo: int
    hi: int
    weights: torch.Tensor  # (last - first, hi - lo) float32


@functools.lru_cache(maxsize=8)
def _mel_bands(n_fft: int, n_mels: int, sampling_rate: int, device: torch.device) -> tuple[_MelBand, ...]:
    """`mel_filters` as float32 bands of `_MELS_PER_BAND` filters on `device`, zero rows left out."""
    filters = mel_filters(n_fft, n_mels, sampling_rate)  # (n_freqs, n_mels) float64
    bands = []
    for first in range(0, n_mels, _MELS_PER_BAND):
        last = min(first + _MELS_PER_BAND, n_mels)
        rows = (filters[:, first:last] != 0).any(dim=1).nonzero()[:, 0]
        lo, hi = int(rows[0]), int(rows[-1]) + 1
        weights = filters[lo:hi, first:last].T.to(device, torch.float32).contiguous()
        bands.append(_MelBand(first, last, lo, hi, weights))
    return tuple(bands)


@functools.lru_cache(maxsize=8)
def _hann(n_fft: int, device: torch.device) -> torch.Tensor:
    return torch.hann_window(n_fft, periodic=True, dtype=torch.float32, device=device)


@dataclass
class _Workspace:
    """Buffers for k windows' intermediates, allocated once per call and reused by every pass."""

    padded: torch.Tensor  # (k, N_FFT // 2 + N_SAMPLES + N_FFT // 2) float32
    frames: torch.Tensor  # (k, N_FRAMES, N_FFT) float32, Hann-windowed
    spectrum: torch.Tensor  # (k, N_FRAMES, n_freqs) complex64
    power: torch.Tensor  # (k, N_FRAMES, n_freqs) float32

    @classmethod
    def create(cls, k: int, device: torch.device) -> _Workspace:
        n_freqs = N_FFT // 2 + 1
        return cls(torch.empty(k, N_SAMPLES + N_FFT, dtype=torch.float32, device=device),
                   torch.empty(k, N_FRAMES, N_FFT, dtype=torch.float32, device=device),
                   torch.empty(k, N_FRAMES, n_freqs, dtype=torch.complex64, device=device),
                   torch.empty(k, N_FRAMES, n_freqs, dtype=torch.float32, device=device))


def _log_mel(windows: list[torch.Tensor], work: _Workspace, out: torch.Tensor) -> None:
    """Write the normalised log-mel of k up-to-30 s windows into `out` (k, n_mels, N_FRAMES)."""
    k, device, n_mels = len(windows), out.device, out.shape[1]
    n_fft, n_samples, pad = N_FFT, N_SAMPLES, N_FFT // 2
    # Zero-pad every window to 30 s, in float32 like HF (which casts float64 input down), between
    # `pad` samples of reflect padding on each side: torch.stft(center=True) without its copy.
    padded = work.padded[:k]  # (k, pad + n_samples + pad)
    for i, w in enumerate(windows):
        padded[i, pad: pad + w.shape[0]] = w
        padded[i, pad + w.shape[0]:].zero_()
    padded[:, :pad] = padded[:, pad + 1: 2 * pad + 1].flip(-1)
    padded[:, pad + n_samples:] = padded[:, n_samples - 1: n_samples + pad - 1].flip(-1)
    # Frame t starts at sample t * hop; only the first N_FRAMES: Whisper drops the STFT's last frame.
    frames = padded.unfold(-1, n_fft, HOP_LENGTH)[:, :N_FRAMES]  # (k, N_FRAMES, N_FFT)
    torch.mul(frames, _hann(n_fft, device), out=work.frames[:k])
    spectrum = torch.fft.rfft(work.frames[:k], out=work.spectrum[:k])  # (k, N_FRAMES, n_freqs)
    parts = torch.view_as_real(spectrum)  # (k, N_FRAMES, n_freqs, 2)
    power = torch.mul(parts[..., 0], parts[..., 0], out=work.power[:k])
    power.addcmul_(parts[..., 1], parts[..., 1])  # |X|^2 without the sqrt of .abs()

    power_t = power.transpose(1, 2)  # (k, n_freqs, N_FRAMES)
    for band in _mel_bands(n_fft, n_mels, SAMPLING_RATE, device):
        # (bands, rows) @ (k, rows, N_FRAMES) -> (k, bands, N_FRAMES)
        torch.matmul(band.weights, power_t[:, band.lo: band.hi], out=out[:, band.first: band.last])

    log_spec = out.clamp_(min=1e-10).log10_()
    # Dynamic range: 80 dB below each window's own maximum.
    peak = log_spec.amax(dim=(1, 2), keepdim=True)  # (k, 1, 1)
    torch.maximum(log_spec, peak - 8.0, out=log_spec).add_(4.0).div_(4.0)


def log_mel_spectrogram(windows: list[torch.Tensor], n_mels: int = N_MELS) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-mel features of up-to-30 s windows, computed on the windows' device
    (one window per pass on the CPU, all at once elsewhere).

    Returns `input_features` (n, n_mels, N_FRAMES) float32 and `input_features_mask`
    (n, N_FRAMES) int32. `n_mels` is the encoder's `AudioConfig.num_mel_bins` (AF3: 128).
    """
    _check_n_mels(n_mels)
    if not isinstance(windows, (list, tuple)):
        raise TypeError(f"windows must be a list of 1-D tensors, got {type(windows).__name__}")
    if not windows:
        raise ValueError("windows is empty: need at least one window")
    device = None
    for i, w in enumerate(windows):
        if not isinstance(w, torch.Tensor):
            raise TypeError(f"window {i} must be a torch.Tensor, got {type(w).__name__}")
        if w.ndim != 1 or not w.is_floating_point():
            raise ValueError(f"window {i} must be a 1-D floating-point tensor, got shape "
                             f"{tuple(w.shape)} dtype {w.dtype}")
        if w.shape[0] > N_SAMPLES:
            raise ValueError(f"window {i} has {w.shape[0]} samples, more than one "
                             f"{CHUNK_LENGTH} s window ({N_SAMPLES}); "
                             "cut clips with af3.windows.window_ranges or use extract_features")
        device = w.device if device is None else device
        if w.device != device:
            raise ValueError(f"window {i} is on {w.device} but window 0 is on {device}")

    n = len(windows)
    features = torch.empty(n, n_mels, N_FRAMES, dtype=torch.float32, device=device)
    step = _CPU_WINDOWS_PER_PASS if device.type == "cpu" else n
    work = _Workspace.create(min(step, n), device)
    for first in range(0, n, step):
        chunk = windows[first: first + step]
        _log_mel(chunk, work, out=features[first: first + len(chunk)])

    valid = torch.tensor([mel_length(w.shape[0]) for w in windows], device=device)
    frames = torch.arange(N_FRAMES, device=device)
    mask = (frames[None, :] < valid[:, None]).to(MASK_DTYPE)  # (n, N_FRAMES)
    return features, mask


def extract_features(clips: list[torch.Tensor], n_mels: int = N_MELS, *,
                     check_finite: bool = True) -> AudioFeatures:
    """Cut 16 kHz mono clips into 30 s windows and compute their `n_mels` log-mel features.

    Clips longer than MAX_SAMPLES (10 minutes) are truncated with a warning.
    All clips must be on the same device; the features are computed there. A clip holding NaN
    or infinite samples is a ValueError; `check_finite=False` skips that pass over the samples
    for clips that `af3.audio.load_audio` has already checked (the processor's path).
    """
    _check_n_mels(n_mels)
    if isinstance(clips, torch.Tensor) or not isinstance(clips, (list, tuple)):
        raise TypeError(f"clips must be a list of 1-D tensors (one per clip), got {type(clips).__name__}")
    if not clips:
        raise ValueError("clips is empty: need at least one audio clip")
    sr = SAMPLING_RATE
    windows: list[torch.Tensor] = []
    windows_per_clip: list[int] = []
    tokens_per_clip: list[int] = []
    for i, clip in enumerate(clips):
        if not isinstance(clip, torch.Tensor):
            raise TypeError(f"clip {i} must be a torch.Tensor, got {type(clip).__name__} "
                            "(af3.audio.load_audio turns files, bytes, URLs and arrays into one)")
        if clip.ndim != 1 or not clip.is_floating_point():
            raise ValueError(f"clip {i} must be a 1-D floating-point tensor of {sr} Hz mono samples, "
                             f"got shape {tuple(clip.shape)} dtype {clip.dtype}")
        if clip.device != clips[0].device:
            raise ValueError(f"clip {i} is on {clip.device} but clip 0 is on {clips[0].device}; "
                             "put all clips on one device")
        n = clip.shape[0]
        if n == 0:
            raise ValueError(f"clip {i} is empty (0 samples): there is no audio to encode")
        if check_finite and not _is_finite(clip):
            raise ValueError(f"clip {i} contains NaN or infinite samples")
        if n > MAX_SAMPLES:
            warnings.warn(f"clip {i} is {n / sr:.1f} s long; only the first {MAX_SECONDS} s "
                          f"({MAX_WINDOWS} windows of {CHUNK_LENGTH} s) are used", stacklevel=2)
        ranges = window_ranges(n)
        windows.extend(clip[start:end] for start, end in ranges)
        windows_per_clip.append(len(ranges))
        tokens_per_clip.append(sum(window_token_count(mel_length(end - start)) for start, end in ranges))
    features, mask = log_mel_spectrogram(windows, n_mels)
    return AudioFeatures(features, mask, windows_per_clip, tokens_per_clip)


def _is_finite(clip: torch.Tensor) -> bool:
    """Whether every sample is finite, in one pass without a temporary: min and max propagate NaN."""
    return all(math.isfinite(float(x)) for x in torch.aminmax(clip))


def _check_n_mels(n_mels: object) -> None:
    if not is_int(n_mels):
        raise TypeError(f"n_mels must be an int (the encoder's num_mel_bins), got {type(n_mels).__name__}")
    if n_mels <= 0:
        raise ValueError(f"n_mels must be positive, got {n_mels}")
