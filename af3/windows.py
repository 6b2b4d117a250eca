"""Window and token-count math: how a clip is cut into 30 s windows and how many <sound> tokens it gets.

Pure integer arithmetic (no torch), so the processor, the model and the tests share one definition.
The sizes are Whisper's (af3.frontend); the functions take them as arguments only so that tests
can try small ones.

A clip of n samples gets ceil(n / 480 000) windows (at least one, at most 20; longer audio is
truncated). Each window's valid mel length is ceil(n_in_window / 160) frames. The encoder's conv2
(stride 2) and the avg-pool (k 2, s 2) then turn L frames into (L + 1) // 4 tokens: 750 for a
full window, 25 per second.
"""

from __future__ import annotations

from af3.config import is_int
from af3.frontend import HOP_LENGTH, MAX_WINDOWS, N_SAMPLES, SAMPLING_RATE

# The first audio token takes 3 mel frames, so audio of this many samples or fewer gives none.
SILENT_SAMPLES = 2 * HOP_LENGTH


def _check_count(name: str, value: int, minimum: int) -> None:
    if not is_int(value):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")


def num_windows(n_samples: int, *, window_samples: int = N_SAMPLES,
                max_windows: int = MAX_WINDOWS) -> int:
    """Windows a clip of `n_samples` gets: ceil(n / window_samples), at least 1, at most `max_windows`."""
    _check_count("n_samples", n_samples, 0)
    _check_count("window_samples", window_samples, 1)
    _check_count("max_windows", max_windows, 1)
    wanted = -(-n_samples // window_samples)  # ceil division
    return min(max(1, wanted), max_windows)


def window_ranges(n_samples: int, *, window_samples: int = N_SAMPLES,
                  max_windows: int = MAX_WINDOWS) -> list[tuple[int, int]]:
    """Each window's sample range `(start, end)`; together they tile the kept audio exactly.

    An empty clip still gets one (empty) window, as in the HF processor.
    """
    n_win = num_windows(n_samples, window_samples=window_samples, max_windows=max_windows)
    kept = min(n_samples, n_win * window_samples)  # audio past the last window is dropped
    return [(i * window_samples, min((i + 1) * window_samples, kept)) for i in range(n_win)]


def mel_length(n_samples_in_window: int, hop_length: int = HOP_LENGTH) -> int:
    """Valid mel frames of a window holding `n_samples_in_window` real samples: ceil(n / hop)."""
    _check_count("n_samples_in_window", n_samples_in_window, 0)
    _check_count("hop_length", hop_length, 1)
    return -(-n_samples_in_window // hop_length)


def conv_length(mel_len):
    """Encoder positions after conv2 (kernel 3, stride 2, padding 1) for `mel_len` valid frames.
    Plain arithmetic: an int gives an int, an integer tensor of lengths a tensor (the encoder's use)."""
    return (mel_len - 1) // 2 + 1


def pooled_length(mel_len):
    """Audio tokens (encoder output frames after the avg-pool, kernel 2, stride 2) for `mel_len`
    valid mel frames; equals (mel_len + 1) // 4. Int or integer tensor, as `conv_length`."""
    return (conv_length(mel_len) - 2) // 2 + 1


def window_token_count(mel_len: int) -> int:
    """Audio tokens from one window with `mel_len` valid frames (after conv2 and the avg-pool)."""
    _check_count("mel_len", mel_len, 0)
    return pooled_length(mel_len)


def audio_token_count(n_samples: int, *, window_samples: int = N_SAMPLES,
                      max_windows: int = MAX_WINDOWS, hop_length: int = HOP_LENGTH) -> int:
    """Audio tokens for a whole clip: the sum over its windows (what one <sound> expands to)."""
    ranges = window_ranges(n_samples, window_samples=window_samples, max_windows=max_windows)
    return sum(window_token_count(mel_length(end - start, hop_length)) for start, end in ranges)


def check_gives_a_token(n_samples: int, what: str) -> None:
    """ValueError naming `what` if a clip of `n_samples` is too short to give any audio token
    (its `<sound>` would vanish, and the model would never hear it)."""
    if audio_token_count(n_samples) == 0:
        raise ValueError(f"{what}: {n_samples} samples is too short to give any audio token (3 mel frames make "
                         f"the first one: more than {SILENT_SAMPLES} samples, {1000 * SILENT_SAMPLES / SAMPLING_RATE:g}"
                         " ms); pad or drop the clip")
