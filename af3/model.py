"""AudioFlamingo3: encoder + projector + Qwen2 decoder, with audio fused into the text in place.

Each `<sound>` token's embedding is replaced, in order, by one projected audio frame; the
sequence length does not change. Everything after that is a plain causal language model.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from af3.config import AF3Config
from af3.encoder import AudioEncoder, pooled_lengths
from af3.generation import GenerationConfig, generate
from af3.projector import Projector
from af3.qwen2 import KVCache, Qwen2Decoder, causal_mask

IGNORE_INDEX = -100  # label value that takes no part in the loss


@dataclass
class ModelOutput:
    """logits (B, T or logits_to_keep, vocab); loss: mean next-token cross-entropy, or None."""

    logits: torch.Tensor
    loss: torch.Tensor | None = None


class AudioFlamingo3(nn.Module):
    """The AF3 model. State-dict names: encoder.*, projector.*, decoder.* (see weights_convert/names.py)."""

    def __init__(self, config: AF3Config):
        super().__init__()
        if not isinstance(config, AF3Config):
            raise TypeError(f"config must be an AF3Config, got {type(config).__name__}")
        self.config = config
        self.encoder = AudioEncoder(config.audio)
        self.projector = Projector(config)
        self.decoder = Qwen2Decoder(config.text)
        self.generation_config = GenerationConfig()  # `generate`'s defaults; af3.load sets the checkpoint's

    # ---- settings -----------------------------------------------------------------------------

    def set_attention(self, backend: str) -> None:
        """'sdpa' (PyTorch's fused kernel, the default) or 'math' (written out, for checking)."""
        if backend not in ("sdpa", "math"):
            raise ValueError(f"attention backend must be 'sdpa' or 'math', got {backend!r}")
        for m in self.modules():
            if hasattr(m, "use_sdpa"):
                m.use_sdpa = backend == "sdpa"

    def new_cache(self, batch_size: int, max_len: int, dtype: torch.dtype | None = None,
                  device: torch.device | str | None = None) -> KVCache:
        """An empty KV cache for `batch_size` sequences of up to `max_len` positions.

        dtype and device default to those of the model's weights.
        """
        for name, v in (("batch_size", batch_size), ("max_len", max_len)):
            if not isinstance(v, int) or isinstance(v, bool):
                raise TypeError(f"{name} must be an int, got {type(v).__name__}")
            if v <= 0:
                raise ValueError(f"{name} must be positive, got {v}")
        weight = self.decoder.embed_tokens.weight
        t = self.config.text
        return KVCache(t.num_hidden_layers, batch_size, t.num_key_value_heads, max_len, t.head_dim,
                       dtype=weight.dtype if dtype is None else dtype,
                       device=weight.device if device is None else device)

    # ---- audio --------------------------------------------------------------------------------

    def get_audio_features(self, input_features: torch.Tensor,
                           input_features_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Projected audio frames (total valid frames over all windows, d_text), windows in order.

        input_features: (n_windows, mel_bins, 3000) log-mel; input_features_mask: (n_windows, 3000),
        nonzero on valid frames (all valid when None).
        """
        return self._encode(input_features, self._check_features(input_features, input_features_mask))

    def _encode(self, input_features: torch.Tensor, mel_lengths: torch.Tensor) -> torch.Tensor:
        weight = self.encoder.conv1.weight
        hidden = self.encoder(input_features.to(weight.dtype), mel_lengths)  # (n, <= 750, d_audio)
        keep = torch.arange(hidden.shape[1], device=hidden.device) < pooled_lengths(mel_lengths)[:, None]
        # Projecting only the kept frames is the same per-frame math as projecting all of them.
        return self.projector(hidden[keep])  # (total_valid, d_text)

    def _check_features(self, features: Any, mask: Any) -> torch.Tensor:
        """Validate the features and return the valid mel length of every window (n,)."""
        if not isinstance(features, torch.Tensor):
            raise TypeError(f"input_features must be a torch.Tensor, got {type(features).__name__}")
        n_mels, n_frames = self.config.audio.num_mel_bins, self.encoder.n_mel_frames
        if features.dim() != 3 or features.shape[1:] != (n_mels, n_frames):
            raise ValueError(f"input_features must have shape (n_windows, {n_mels}, {n_frames}), got "
                             f"{tuple(features.shape)}")
        if not features.is_floating_point():
            raise TypeError(f"input_features must be floating point, got {features.dtype}")
        device = self.encoder.conv1.weight.device
        if features.device != device:
            raise ValueError(f"input_features is on {features.device} but the model is on {device}; "
                             "move the inputs with .to(device)")
        if mask is None:
            return torch.full((features.shape[0],), n_frames, dtype=torch.long, device=device)
        if not isinstance(mask, torch.Tensor):
            raise TypeError(f"input_features_mask must be a torch.Tensor, got {type(mask).__name__}")
        if mask.shape != (features.shape[0], n_frames):
            raise ValueError(f"input_features_mask must have shape {(features.shape[0], n_frames)} to "
                             f"match input_features, got {tuple(mask.shape)}")
        if mask.device != device:
            raise ValueError(f"input_features_mask is on {mask.device} but the model is on {device}")
        return (mask != 0).sum(-1)  # (n,)

    # ---- forward ------------------------------------------------------------------------------

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                input_features: torch.Tensor | None = None,
                input_features_mask: torch.Tensor | None = None, labels: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None, cache: KVCache | None = None,
                logits_to_keep: int = 0) -> ModelOutput:
        """Logits (and loss, with labels) for token ids (B, T) with optional audio.

        attention_mask: (B, S) nonzero on real tokens, S = T, or cache.length + T with a cache.
        position_ids: (B, T); by default counted from the attention mask, so left padding does
        not shift them. cache: from `new_cache`; the new keys/values are written at cache.length
        and the cache advances by T. logits_to_keep: if > 0, logits of the last that many tokens.
        Audio goes in with the first pass only: once the cache holds tokens, `<sound>` ids among
        the new ones (a sampled one, say) are embedded as ordinary tokens, so decoding cannot fail.
        """
        b, t = self._check_ids(input_ids)
        device = input_ids.device
        start = 0
        if cache is not None:
            if not isinstance(cache, KVCache):
                raise TypeError(f"cache must be a KVCache from model.new_cache, got {type(cache).__name__}")
            if cache.k.device != device:
                raise ValueError(f"cache is on {cache.k.device} but input_ids is on {device}")
            cache.check_room(b, t)
            start = cache.length
        if attention_mask is not None:
            self._check_mask(attention_mask, b, start + t, cache is not None, device)
        if position_ids is None:
            position_ids = _positions(attention_mask, start, t, device)
        elif not isinstance(position_ids, torch.Tensor):
            raise TypeError(f"position_ids must be a torch.Tensor, got {type(position_ids).__name__}")
        elif position_ids.dim() != 2 or position_ids.shape[0] not in (1, b) or position_ids.shape[1] != t:
            raise ValueError(f"position_ids must have shape ({b}, {t}), got {tuple(position_ids.shape)}")
        if not isinstance(logits_to_keep, int) or isinstance(logits_to_keep, bool) or logits_to_keep < 0:
            raise ValueError(f"logits_to_keep must be an int >= 0, got {logits_to_keep!r}")
        if labels is not None:
            _check_labels(labels, b, t, logits_to_keep)

        is_audio = input_ids == self.config.audio_token_id
        n_tokens = self._check_ids_values(input_ids, is_audio)
        x = self.decoder.embed_tokens(input_ids)  # (B, T, d)
        if input_features is not None:
            mel_lengths = self._check_features(input_features, input_features_mask)
            n_frames = int(pooled_lengths(mel_lengths).sum())
            if n_tokens != n_frames:  # checked before the encoder runs
                raise ValueError(f"Audio tokens and features mismatch: {n_tokens} <sound> tokens but "
                                 f"{n_frames} audio frames")
            audio = self._encode(input_features, mel_lengths)  # (n_frames, d)
            x[is_audio] = audio.to(x.dtype)  # row-major order: sample by sample, left to right
        elif n_tokens and (cache is None or cache.length == 0):
            raise ValueError(f"Audio tokens and features mismatch: {n_tokens} <sound> tokens but 0 "
                             "audio frames (no input_features given)")
        elif input_features_mask is not None:
            raise ValueError("input_features_mask given without input_features")

        # Without padding or history, leave the mask implicit (SDPA's causal kernels are faster).
        mask = None if attention_mask is None and start == 0 else causal_mask(attention_mask, start, t, device)
        h = self.decoder(x, position_ids, mask, cache)
        if cache is not None:
            cache.advance(t)
        if logits_to_keep:
            h = h[:, -logits_to_keep:]
        logits = self.decoder.logits(h)
        loss = None if labels is None else _next_token_loss(logits, labels, attention_mask)
        return ModelOutput(logits=logits, loss=loss)

    def generate(self, **kwargs: Any) -> Any:
        """Autoregressive decoding; see `af3.generation.generate`."""
        return generate(self, **kwargs)

    # ---- checks -------------------------------------------------------------------------------

    def _check_ids(self, input_ids: Any) -> tuple[int, int]:
        if not isinstance(input_ids, torch.Tensor):
            raise TypeError(f"input_ids must be a torch.Tensor, got {type(input_ids).__name__}")
        if input_ids.dim() != 2 or input_ids.shape[1] == 0:
            raise ValueError(f"input_ids must have shape (batch, seq_len) with seq_len >= 1, got "
                             f"{tuple(input_ids.shape)}")
        if input_ids.dtype not in (torch.int64, torch.int32):
            raise TypeError(f"input_ids must be int64 or int32, got {input_ids.dtype}")
        device = self.decoder.embed_tokens.weight.device
        if input_ids.device != device:
            raise ValueError(f"input_ids is on {input_ids.device} but the model is on {device}; "
                             "move the inputs with .to(device)")
        return input_ids.shape[0], input_ids.shape[1]

    def _check_ids_values(self, input_ids: torch.Tensor, is_audio: torch.Tensor) -> int:
        """Check the ids are in the vocabulary; return the <sound> count. One device sync."""
        lo, hi, n_audio = torch.stack([input_ids.min().long(), input_ids.max().long(), is_audio.sum()]).tolist()
        vocab = self.config.text.vocab_size
        if lo < 0 or hi >= vocab:
            # An out-of-range id would be a device-side assert on GPU; say which id instead.
            raise ValueError(f"input_ids contains {lo if lo < 0 else hi}, outside the vocabulary "
                             f"[0, {vocab})")
        return n_audio

    @staticmethod
    def _check_mask(mask: Any, b: int, s: int, cached: bool, device: torch.device) -> None:
        if not isinstance(mask, torch.Tensor):
            raise TypeError(f"attention_mask must be a torch.Tensor, got {type(mask).__name__}")
        if mask.shape != (b, s):
            where = " (cache.length + new tokens: the mask covers every position so far)" if cached else ""
            raise ValueError(f"attention_mask must have shape ({b}, {s}){where}, got {tuple(mask.shape)}")
        if mask.device != device:
            raise ValueError(f"attention_mask is on {mask.device} but input_ids is on {device}")


def _positions(attention_mask: torch.Tensor | None, start: int, t: int,
               device: torch.device) -> torch.Tensor:
    """Positions of the T new tokens: count of real tokens before each one (padding gets 0)."""
    if attention_mask is None:
        return torch.arange(start, start + t, device=device)[None]  # (1, T)
    real = attention_mask != 0
    pos = real.long().cumsum(-1) - 1  # (B, S)
    return pos.masked_fill(~real, 0)[:, start:]  # (B, T)


def _check_labels(labels: object, b: int, t: int, logits_to_keep: int) -> None:
    if not isinstance(labels, torch.Tensor):
        raise TypeError(f"labels must be a torch.Tensor, got {type(labels).__name__}")
    if labels.shape != (b, t):
        raise ValueError(f"labels must have shape ({b}, {t}) like input_ids, got {tuple(labels.shape)}")
    if logits_to_keep:
        raise ValueError("labels need every position's logits: logits_to_keep must be 0 to train")
    if labels.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"labels must be int64 or int32, got {labels.dtype}")


def _next_token_loss(logits: torch.Tensor, labels: torch.Tensor,
                     attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Mean cross-entropy of predicting labels[:, i + 1] from logits[:, i]; -100 is ignored.

    A target whose predicting position is padding (attention_mask 0 there: the last pad of a
    left-padded row "predicts" its first token) is ignored too: those logits saw no real token.
    HF counts it, so a left-padded row's loss would differ from the same row alone.
    """
    shifted = F.pad(labels.long().to(logits.device), (0, 1), value=IGNORE_INDEX)[:, 1:]  # (B, T): the last has none
    if attention_mask is not None:
        shifted = shifted.masked_fill(attention_mask[:, -shifted.shape[1]:] == 0, IGNORE_INDEX)
    return F.cross_entropy(logits.float().flatten(0, 1), shifted.flatten(), ignore_index=IGNORE_INDEX)
