"""Whisper's audio frontend as AF3 uses it, stated once.

AF3's encoder is Whisper-large-v3's: it was trained on log-mels of 30 s windows of 16 kHz audio,
and AF3 hears at most 20 windows. None of this can vary between checkpoints, so these are
constants, not config settings: audio, windows, mel, the processor, longform, the model's input
check, the config (the encoder's 1500 positions are N_FRAMES // 2) and the converter import them.
The number of mel bins is a dimension of the encoder's first layer: a checkpoint states its own
in `AudioConfig.num_mel_bins`; N_MELS is AF3's, the default.
"""

SAMPLING_RATE = 16_000  # Hz: what the model consumes
N_FFT = 400  # samples per STFT frame: 25 ms
HOP_LENGTH = 160  # samples between mel frames: 10 ms
CHUNK_LENGTH = 30  # seconds per encoder window
N_SAMPLES = CHUNK_LENGTH * SAMPLING_RATE  # 480 000 samples per window
N_FRAMES = N_SAMPLES // HOP_LENGTH  # 3000 mel frames per window
N_MELS = 128  # mel bins of Whisper-large-v3, and so of AF3
MAX_WINDOWS = 20  # windows of one clip AF3 hears
MAX_SECONDS = MAX_WINDOWS * CHUNK_LENGTH  # 600: ten minutes; anything later is ignored
MAX_SAMPLES = MAX_WINDOWS * N_SAMPLES  # 9 600 000
