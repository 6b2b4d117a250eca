"""Window and token-count math: known answers and properties."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from af3.frontend import MAX_SAMPLES, MAX_WINDOWS, N_SAMPLES
from af3.windows import (
    audio_token_count,
    mel_length,
    num_windows,
    window_ranges,
    window_token_count,
)

samples = st.integers(min_value=0, max_value=MAX_SAMPLES + 3 * N_SAMPLES)


@pytest.mark.parametrize(
    "n, windows, tokens",
    [
        (0, 1, 0),
        (1, 1, 0),  # 1 mel frame: conv -> 1, pool -> 0
        (159, 1, 0),
        (160, 1, 0),
        (161, 1, 0),  # 2 frames
        (479_999, 1, 750),  # 3000 frames
        (480_000, 1, 750),
        (480_001, 2, 750),  # second window holds 1 sample -> 1 frame -> 0 tokens
        (9_600_000, 20, 15_000),
        (9_600_001, 20, 15_000),  # truncated to 20 windows
    ],
)
def test_known_answers(n: int, windows: int, tokens: int) -> None:
    assert num_windows(n) == windows
    assert len(window_ranges(n)) == windows
    assert audio_token_count(n) == tokens


@pytest.mark.parametrize("n, frames", [(0, 0), (1, 1), (159, 1), (160, 1), (161, 2),
                                       (479_999, 3000), (480_000, 3000)])
def test_mel_length_known_answers(n: int, frames: int) -> None:
    assert mel_length(n) == frames


def test_token_count_small_lengths() -> None:
    # conv2 (k3 s2 p1) then avg-pool (k2 s2), written out by hand for the first frames.
    assert [window_token_count(L) for L in range(9)] == [0, 0, 0, 1, 1, 1, 1, 2, 2]
    assert window_token_count(3000) == 750


def test_ranges_known_answer() -> None:
    assert window_ranges(0) == [(0, 0)]
    assert window_ranges(480_001) == [(0, 480_000), (480_000, 480_001)]
    assert window_ranges(1000, window_samples=400, max_windows=2) == [(0, 400), (400, 800)]


@settings(max_examples=200, deadline=None)
@given(samples)
def test_windows_tile_kept_audio(n: int) -> None:
    ranges = window_ranges(n)
    kept = min(n, MAX_SAMPLES)
    assert ranges[0][0] == 0
    assert ranges[-1][1] == kept
    for (_, end), (start, _) in itertools.pairwise(ranges):
        assert end == start  # no gap, no overlap
    for start, end in ranges:
        assert 0 <= end - start <= N_SAMPLES
    # Every window but the last is full.
    assert all(end - start == N_SAMPLES for start, end in ranges[:-1])


@settings(max_examples=200, deadline=None)
@given(samples)
def test_per_window_sum_equals_closed_form(n: int) -> None:
    total_mel = sum(mel_length(end - start) for start, end in window_ranges(n))
    assert audio_token_count(n) == (total_mel + 1) // 4
    assert all(window_token_count(L) == (L + 1) // 4 for L in range(0, 3001, 7))


@settings(max_examples=200, deadline=None)
@given(samples, st.integers(min_value=0, max_value=2 * N_SAMPLES))
def test_totals_never_decrease(n: int, extra: int) -> None:
    assert audio_token_count(n + extra) >= audio_token_count(n)
    assert num_windows(n + extra) >= num_windows(n)


@settings(max_examples=100, deadline=None)
@given(samples, st.integers(min_value=1, max_value=25), st.integers(min_value=160, max_value=600_000))
def test_cap_holds(n: int, max_windows: int, window: int) -> None:
    ranges = window_ranges(n, window_samples=window, max_windows=max_windows)
    assert 1 <= len(ranges) <= max_windows
    assert ranges[-1][1] == min(n, max_windows * window)
    assert audio_token_count(n) <= MAX_WINDOWS * 750


def test_full_window_gives_750() -> None:
    assert window_token_count(mel_length(N_SAMPLES)) == 750


@pytest.mark.parametrize("call, error, message", [
    (lambda: num_windows(-1), ValueError, "n_samples must be >= 0, got -1"),
    (lambda: num_windows(1.5), TypeError, "n_samples must be an int, got float"),
    (lambda: num_windows(10, window_samples=0), ValueError, "window_samples must be >= 1, got 0"),
    (lambda: window_ranges(10, max_windows=0), ValueError, "max_windows must be >= 1, got 0"),
    (lambda: mel_length(-1), ValueError, "n_samples_in_window must be >= 0, got -1"),
    (lambda: mel_length(10, hop_length=0), ValueError, "hop_length must be >= 1, got 0"),
    (lambda: window_token_count(-3), ValueError, "mel_len must be >= 0, got -3"),
    (lambda: window_token_count(True), TypeError, "mel_len must be an int, got bool"),
])
def test_bad_arguments_are_named_with_the_value(call, error, message) -> None:
    with pytest.raises(error, match=f"^{message}$"):
        call()


def test_smallest_allowed_settings_and_non_default_ones() -> None:
    assert mel_length(7, hop_length=1) == 7
    assert num_windows(5, window_samples=1) == 5
    assert window_ranges(5, window_samples=2, max_windows=2) == [(0, 2), (2, 4)]
    # Every setting reaches the count: windows of 1 s, at most 3, hop 320 (50 frames a second).
    assert audio_token_count(16_000 * 5, window_samples=16_000, max_windows=3, hop_length=320) == 3 * 12
    assert audio_token_count(16_000 * 5, window_samples=16_000, max_windows=3) == 3 * 25
    assert audio_token_count(16_000 * 5, window_samples=16_000) == 5 * 25
    assert audio_token_count(16_000 * 5, hop_length=320) == 62


@settings(deadline=None)  # no 200 ms limit on an example: a stalled CI machine is not a failure
@given(n=st.integers(0, 10_000))
def test_counts_are_ints(n: int) -> None:
    assert type(window_token_count(n)) is int and type(mel_length(n)) is int
    assert type(audio_token_count(n)) is int
