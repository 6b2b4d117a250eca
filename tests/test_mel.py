"""Log-mel frontend: parity with HF's WhisperFeatureExtractor and AudioFlamingo3Processor, and bad input."""

from __future__ import annotations

import math
import os
import re
import warnings

import numpy as np
import pytest
import torch
import torchaudio
import transformers

import af3.mel
from af3.frontend import MAX_SAMPLES, N_SAMPLES
from af3.mel import MASK_DTYPE, extract_features, log_mel_spectrogram, mel_filters
from af3.windows import audio_token_count
from tests.devices import DEVICES

SR = 16_000
LENGTHS = [1, 159, 160, 161, 16_000, 123_457, 479_999, 480_000]


def speech_like(n: int, seed: int) -> np.ndarray:
    """Voiced harmonics with a gliding pitch, formant-shaped spectrum, syllable envelope and pauses."""
    g = np.random.default_rng(seed)
    t = np.arange(n) / SR
    f0 = 120 + 40 * np.sin(2 * np.pi * 0.7 * t + g.uniform(0, 6))  # Hz
    phase = 2 * np.pi * np.cumsum(f0) / SR
    formants = [(700, 130), (1200, 200), (2600, 300)]
    x = np.zeros(n)
    for k in range(1, 30):
        freq = k * f0
        amp = sum(np.exp(-0.5 * ((freq - fc) / bw) ** 2) for fc, bw in formants) / k
        x += amp * np.sin(k * phase) * (freq < SR / 2)
    syllables = np.clip(np.sin(2 * np.pi * 4 * t), 0, None) ** 2
    pauses = (np.sin(2 * np.pi * 0.3 * t) > -0.6).astype(float)
    x = x * syllables * pauses + 1e-3 * g.standard_normal(n)
    return (0.3 * x / max(np.abs(x).max(), 1e-9)).astype(np.float32)


def noise(n: int, seed: int) -> np.ndarray:
    return (0.1 * np.random.default_rng(seed).standard_normal(n)).astype(np.float32)


def tone(n: int, seed: int) -> np.ndarray:
    # A pure tone concentrates the energy in a few STFT bins: the hardest case for filterbank error.
    freq = 50 + 7900 * np.random.default_rng(seed).uniform()
    return (0.5 * np.sin(2 * np.pi * freq * np.arange(n) / SR)).astype(np.float32)


@pytest.fixture(scope="module")
def hf_extractor():
    return transformers.WhisperFeatureExtractor(feature_size=128)


def hf_features(extractor, windows: list[np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
    # As AudioFlamingo3Processor calls it on its windows.
    out = extractor(windows, sampling_rate=SR, return_attention_mask=True, return_tensors="pt")
    return out["input_features"], out["attention_mask"]


@pytest.mark.parametrize("make", [speech_like, noise, tone])
def test_matches_whisper_feature_extractor(hf_extractor, make) -> None:
    # Different gains in one batch: each window must be normalised by its own maximum.
    windows = [make(n, seed) * gain for seed, (n, gain) in
               enumerate(zip(LENGTHS, [1.0, 30.0, 0.01, 1.0, 3.0, 1.0, 0.001, 1.0]))]
    ref_feat, ref_mask = hf_features(hf_extractor, windows)
    feat, mask = log_mel_spectrogram([torch.from_numpy(w) for w in windows])
    assert feat.shape == (len(LENGTHS), 128, 3000) and feat.dtype == torch.float32
    assert (feat - ref_feat).abs().max().item() <= 1e-4
    assert mask.dtype == ref_mask.dtype == MASK_DTYPE
    assert torch.equal(mask, ref_mask)
    assert mask.sum(-1).tolist() == [math.ceil(n / 160) for n in LENGTHS]


def test_tones_across_the_band(hf_extractor) -> None:
    windows = [tone(48_000, seed) for seed in range(24)]
    ref_feat, _ = hf_features(hf_extractor, windows)
    feat, _ = log_mel_spectrogram([torch.from_numpy(w) for w in windows])
    assert (feat - ref_feat).abs().max().item() <= 1e-4


def test_silence_and_float64(hf_extractor) -> None:
    windows = [np.zeros(1000, np.float32), speech_like(20_000, 1)]
    ref_feat, _ = hf_features(hf_extractor, windows)
    feat, _ = log_mel_spectrogram([torch.from_numpy(w).double() for w in windows])
    assert torch.all(feat[0] == -1.5)  # log10(1e-10) = -10 everywhere, (-10 + 4) / 4
    assert (feat - ref_feat).abs().max().item() <= 1e-4


# Around the frame boundaries (every 160 samples, shifted by the 200 samples of reflect padding),
# and around the length from which the right reflect padding mirrors real samples (479 800).
SKIPPED_FRAME_LENGTHS = [1, 2, 159, 160, 161, 199, 200, 201, 239, 240, 241, 359, 360, 361, 16_000, 16_039,
                         16_040, 16_041, 123_457, 479_598, 479_599, 479_600, 479_601, 479_799, 479_800]


@pytest.mark.parametrize("make", [speech_like, tone])
def test_frames_of_padding_only_are_exact(make, monkeypatch) -> None:
    # A window of n samples is computed only over the frames that see one of them, the rest filled
    # in; the same samples zero-padded to a full window (every frame computed) must give the same.
    for seed, n in enumerate(SKIPPED_FRAME_LENGTHS):
        w = torch.from_numpy(make(n, seed))
        full = torch.cat([w, w.new_zeros(N_SAMPLES - n)])
        (short, full), _ = log_mel_spectrogram([w, full])
        assert (short - full).abs().max().item() <= 1e-6, n
    # Windows of different lengths in one pass (how a GPU runs them): each keeps its own maximum.
    monkeypatch.setattr(af3.mel, "_CPU_WINDOWS_PER_PASS", 2)
    windows = [torch.from_numpy(make(n, seed) * gain) for seed, (n, gain) in enumerate([(200, 1.0), (16_041, 0.001)])]
    batched, _ = log_mel_spectrogram(windows)
    alone = torch.cat([log_mel_spectrogram([w])[0] for w in windows])
    assert (batched - alone).abs().max().item() <= 1e-6


@pytest.mark.parametrize("n_fft, n_mels, sr", [(400, 128, 16_000), (400, 80, 16_000), (512, 64, 22_050)])
def test_filterbank_is_torchaudios_slaney_filterbank(n_fft: int, n_mels: int, sr: int) -> None:
    ref = torchaudio.functional.melscale_fbanks(n_fft // 2 + 1, 0.0, sr / 2, n_mels, sr,
                                                norm="slaney", mel_scale="slaney")
    ours = mel_filters(n_fft, n_mels, sr)
    assert ours.shape == ref.shape and ours.dtype == torch.float64
    # torchaudio works in float32; ours is the float64 version of the same filters.
    torch.testing.assert_close(ours.float(), ref, atol=1e-6, rtol=0)


# (400, 128, 16 kHz) is AF3's; n_fft 402 puts the bins off float32's grid; 1.6 kHz has its Nyquist
# below the slaney scale's 1 kHz knee (the linear part only), 2001 Hz just above it; 11 025 Hz is odd
# (bins up to sr // 2).
@pytest.mark.parametrize("n_fft, n_mels, sr", [(400, 128, 16_000), (402, 80, 16_000), (64, 8, 1_600),
                                               (64, 8, 2_001), (400, 40, 11_025)])
def test_filterbank_equals_transformers_float64_filterbank(n_fft: int, n_mels: int, sr: int) -> None:
    from transformers.audio_utils import mel_filter_bank

    ref = mel_filter_bank(num_frequency_bins=n_fft // 2 + 1, num_mel_filters=n_mels, min_frequency=0.0,
                          max_frequency=sr / 2, sampling_rate=sr, norm="slaney", mel_scale="slaney")
    # Both are built in float64: equal to rounding, far tighter than any float32 step would allow.
    np.testing.assert_allclose(mel_filters(n_fft, n_mels, sr).numpy(), ref, rtol=0, atol=1e-14)


def tiny_hf_processor():
    """AudioFlamingo3Processor with a word-level tokenizer built in memory (no files, no network)."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<unk>": 0, "<|endoftext|>": 1, "<sound>": 2, "hi": 3}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>",
                                                     pad_token="<|endoftext|>")
    tokenizer.add_special_tokens({"additional_special_tokens": ["<sound>"]})
    extractor = transformers.WhisperFeatureExtractor(feature_size=128)
    return transformers.AudioFlamingo3Processor(extractor, tokenizer)


def test_extract_features_matches_hf_processor() -> None:
    processor = tiny_hf_processor()
    lengths = [1_000, 480_001, 1_000_000, 350]
    clips = [speech_like(n, seed) if seed % 2 else noise(n, seed) for seed, n in enumerate(lengths)]
    ref = processor(text=["hi <sound>"] * len(clips), audio=clips)
    ours = extract_features([torch.from_numpy(c) for c in clips])

    assert ours.windows_per_clip == [1, 2, 3, 1]
    assert ours.input_features.shape == ref["input_features"].shape == (7, 128, 3000)
    assert (ours.input_features - ref["input_features"]).abs().max().item() <= 1e-4
    assert ours.input_features_mask.dtype == ref["input_features_mask"].dtype
    assert torch.equal(ours.input_features_mask, ref["input_features_mask"])
    hf_tokens = (ref["input_ids"] == processor.audio_token_id).sum(-1).tolist()
    assert ours.tokens_per_clip == hf_tokens == [audio_token_count(n) for n in lengths]


def test_truncation_matches_hf_processor() -> None:
    processor = tiny_hf_processor()
    clip = noise(MAX_SAMPLES + SR, 7)  # 601 s
    ref = processor(text=["<sound>"], audio=[clip])
    with pytest.warns(UserWarning, match=r"^clip 0 is 601\.0 s long; only the first 600 s \(20 windows of 30 s\) "
                      r"are used$") as caught:
        ours = extract_features([torch.from_numpy(clip)])
    if "MUTANT_UNDER_TEST" not in os.environ:  # under `make mutate`, mutmut's trampoline is one frame more
        assert caught[0].filename == __file__  # the warning points at the caller's line
    assert ours.windows_per_clip == [20] and ours.tokens_per_clip == [15_000]
    assert (ref["input_ids"] == processor.audio_token_id).sum().item() == 15_000
    assert (ours.input_features - ref["input_features"]).abs().max().item() <= 1e-4
    assert torch.equal(ours.input_features_mask, ref["input_features_mask"])


def test_no_warning_at_the_limit() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = extract_features([torch.zeros(MAX_SAMPLES) + 0.1])
    assert out.windows_per_clip == [20] and out.tokens_per_clip == [15_000]


@pytest.mark.parametrize("device", DEVICES)
def test_runs_on_input_device(device: str) -> None:
    clips = [torch.from_numpy(speech_like(n, seed)) for seed, n in enumerate([1600, 500_000])]
    ref = extract_features(clips)
    out = extract_features([c.to(device) for c in clips])
    assert out.input_features.device.type == out.input_features_mask.device.type == device
    assert (out.input_features.cpu() - ref.input_features).abs().max().item() <= 1e-4
    assert torch.equal(out.input_features_mask.cpu(), ref.input_features_mask)
    assert out.tokens_per_clip == ref.tokens_per_clip


def test_all_work_happens_on_the_windows_device() -> None:
    """Every buffer is made on the windows' device: meta stands in for an accelerator on a CPU-only
    machine (a buffer made on the CPU fails the first copy from a meta window)."""
    feats, mask = log_mel_spectrogram([torch.zeros(1000, device="meta"), torch.zeros(20_000, device="meta")])
    assert feats.device.type == mask.device.type == "meta"
    assert (feats.shape, feats.dtype, mask.shape, mask.dtype) == ((2, 128, 3000), torch.float32, (2, 3000), MASK_DTYPE)


def test_a_float64_default_dtype_changes_nothing() -> None:
    """The frontend names every buffer's dtype: a caller's torch.set_default_dtype does not reach it.
    The window is float64 with more precision than float32 holds: it is rounded to float32 first, as HF does."""
    clip = torch.from_numpy(speech_like(4000, 3)).double()
    windows = [clip + torch.randn(clip.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(0)) * 1e-6]
    feats, mask = log_mel_spectrogram(windows)
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        feats64, mask64 = log_mel_spectrogram(windows)
    finally:
        torch.set_default_dtype(default)
    assert feats64.dtype == torch.float32 and torch.equal(feats64, feats) and torch.equal(mask64, mask)


SHAPE = "clip 0 must be a 1-D floating-point tensor of 16000 Hz mono samples, got shape"


# Whole messages (matched from start to end): a message is part of the behaviour.
@pytest.mark.parametrize(
    "clips, error, message",
    [
        (torch.zeros(100), TypeError, "clips must be a list of 1-D tensors (one per clip), got Tensor"),
        ({"clip": torch.zeros(10)}, TypeError, "clips must be a list of 1-D tensors (one per clip), got dict"),
        ([], ValueError, "clips is empty: need at least one audio clip"),
        ([np.zeros(100, np.float32)], TypeError, ("clip 0 must be a torch.Tensor, got ndarray "
         "(af3.audio.load_audio turns files, bytes, URLs and arrays into one)")),
        ([torch.zeros(2, 100)], ValueError, f"{SHAPE} (2, 100) dtype torch.float32"),
        ([torch.zeros(100, dtype=torch.int16)], ValueError, f"{SHAPE} (100,) dtype torch.int16"),
        ([torch.zeros(10), torch.zeros(0)], ValueError, "clip 1 is empty (0 samples): there is no audio to encode"),
        ([torch.tensor([0.0, float("nan")])], ValueError, "clip 0 contains NaN or infinite samples"),
        ([torch.tensor([0.0, float("inf")])], ValueError, "clip 0 contains NaN or infinite samples"),
        # The check reads only the min and max: -inf shows in the min, a NaN anywhere in both.
        ([torch.tensor([0.0, -float("inf"), 1.0])], ValueError, "clip 0 contains NaN or infinite samples"),
        ([torch.cat([torch.zeros(100_000), torch.tensor([float("nan")]), torch.ones(100_000)])],
         ValueError, "clip 0 contains NaN or infinite samples"),
        ([torch.zeros(10), torch.zeros(10, device="meta")], ValueError,
         "clip 1 is on meta but clip 0 is on cpu; put all clips on one device"),
    ],
)
def test_extract_features_bad_input(clips, error, message) -> None:
    with pytest.raises(error, match=f"^{re.escape(message)}$"):
        extract_features(clips)


def test_check_finite_false_skips_the_nan_pass() -> None:
    clip = torch.tensor([0.0, float("nan")] * 200)
    out = extract_features([clip], check_finite=False)  # the caller vouched for it
    assert out.tokens_per_clip == [1]


def test_log_mel_bad_input() -> None:
    for call in (log_mel_spectrogram, extract_features):
        with pytest.raises(TypeError, match="n_mels must be an int .*, got NoneType"):
            call([torch.zeros(10)], None)
        with pytest.raises(ValueError, match="n_mels must be positive, got 0"):
            call([torch.zeros(10)], 0)
        with pytest.raises(TypeError, match=r"n_mels must be an int \(the encoder's num_mel_bins\), got str"):
            call([torch.zeros(10)], "80")
    assert log_mel_spectrogram([torch.zeros(10)], 1)[0].shape == (1, 1, 3000)  # one bin is still a filterbank
    cases = [
        ([torch.zeros(480_001)], ValueError, ("window 0 has 480001 samples, more than one 30 s window (480000); "
         "cut clips with af3.windows.window_ranges or use extract_features")),
        ([], ValueError, "windows is empty: need at least one window"),
        (torch.zeros(3), TypeError, "windows must be a list of 1-D tensors, got Tensor"),
        ([torch.zeros(10), [0.0] * 10], TypeError, "window 1 must be a torch.Tensor, got list"),
        ([torch.zeros(2, 3)], ValueError, ("window 0 must be a 1-D floating-point tensor, got shape (2, 3) dtype "
         "torch.float32")),
        ([torch.zeros(3, dtype=torch.int64)], ValueError, ("window 0 must be a 1-D floating-point tensor, got "
         "shape (3,) dtype torch.int64")),
        ([torch.zeros(10), torch.zeros(10, device="meta")], ValueError, "window 1 is on meta but window 0 is on cpu"),
    ]
    for windows, error, message in cases:
        with pytest.raises(error, match=f"^{re.escape(message)}$"):
            log_mel_spectrogram(windows)


def test_extract_features_with_80_mels_equals_whisper_feature_extractor() -> None:
    # n_mels reaches the filterbank: 80 bins (Whisper before large-v3) as transformers computes them.
    clip = speech_like(40_000, 3)
    ref = transformers.WhisperFeatureExtractor(feature_size=80)(clip, sampling_rate=16_000, return_tensors="pt")
    ours = extract_features([torch.from_numpy(clip)], n_mels=80)
    assert ours.input_features.shape == ref["input_features"].shape == (1, 80, 3000)
    assert (ours.input_features - ref["input_features"]).abs().max().item() <= 1e-4
