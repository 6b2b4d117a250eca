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

from af3.config import AF3Config, is_int
from af3.encoder import AudioEncoder
from af3.frontend import N_FRAMES
from af3.generation import GenerationConfig, generate
from af3.limits import check_fits, kv_cache_bytes
from af3.processor import IGNORE_INDEX
from af3.projector import Projector
from af3.qwen2 import KVCache, Qwen2Decoder, causal_mask, positions_from_mask
from af3.windows import pooled_length


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
            if not is_int(v):
                raise TypeError(f"{name} must be an int, got {type(v).__name__}")
            if v <= 0:
                raise ValueError(f"{name} must be positive, got {v}")
        weight = self.decoder.embed_tokens.weight
        t = self.config.text
        dtype, device = weight.dtype if dtype is None else dtype, weight.device if device is None else device
        check_fits(kv_cache_bytes(t, batch_size, max_len, dtype), device,
                   f"a KV cache of {batch_size} x {max_len:,} positions (max_len)", "lower max_len")
        return KVCache(t.num_hidden_layers, batch_size, t.num_key_value_heads, max_len, t.head_dim,
                       dtype=dtype, device=device)

    # ---- audio --------------------------------------------------------------------------------

    def get_audio_features(self, input_features: torch.Tensor,
                           input_features_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Projected audio frames (total valid frames over all windows, d_text), windows in order.

        input_features: (n_windows, mel_bins, 3000) log-mel; input_features_mask: (n_windows, 3000),
        nonzero on valid frames (all valid when None).
        """
        self._check_features(input_features, input_features_mask)
        return self._encode(input_features, input_features_mask)

    def _encode(self, input_features: torch.Tensor, input_features_mask: torch.Tensor | None) -> torch.Tensor:
        weight = self.encoder.conv1.weight
        if input_features_mask is None:
            mel_lengths = torch.full(input_features.shape[:1], input_features.shape[-1], device=weight.device)
        else:
            mel_lengths = (input_features_mask != 0).sum(-1)  # (n,)
        hidden = self.encoder(input_features.to(weight.dtype), mel_lengths)  # (n, <= 750, d_audio)
        keep = torch.arange(hidden.shape[1], device=hidden.device) < pooled_length(mel_lengths)[:, None]
        # Projecting only the kept frames is the same per-frame math as projecting all of them.
        return self.projector(hidden[keep])  # (total_valid, d_text)

    # ---- forward ------------------------------------------------------------------------------

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                input_features: torch.Tensor | None = None,
                input_features_mask: torch.Tensor | None = None, labels: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None, cache: KVCache | None = None,
                input_pos: torch.Tensor | None = None, logits_to_keep: int = 0) -> ModelOutput:
        """Logits (and loss, with labels) for token ids (B, T) with optional audio.

        attention_mask: (B, S) nonzero on real tokens; S = T without a cache. cache: from
        `new_cache`; the new keys/values are written at slots `input_pos` (T,) (default 0..T-1)
        and the queries attend over slots [0, S) (S = cache.max_len without a mask), causally.
        position_ids (B, T): RoPE positions, by default counted from the mask so left padding
        does not shift them. logits_to_keep: if > 0, logits of the last that many tokens only.
        Checks its inputs (`check_inputs`); a decoding loop's steps go through `decode_step`.
        """
        self.check_inputs(input_ids, attention_mask, input_features, input_features_mask, labels,
                          position_ids=position_ids, cache=cache, input_pos=input_pos,
                          logits_to_keep=logits_to_keep)
        t = input_ids.shape[1]
        x = self.decoder.embed_tokens(input_ids)  # (B, T, d)
        if input_features is not None:
            audio = self._encode(input_features, input_features_mask)  # (n_frames, d)
            is_audio = (input_ids == self.config.audio_token_id)[..., None]  # (B, T, 1)
            x = x.masked_scatter(is_audio, audio.to(x.dtype))  # row-major: sample by sample, left to right
        if input_pos is None:
            input_pos = torch.arange(t, device=x.device)  # (T,)
        if position_ids is None:
            position_ids = input_pos[None] if attention_mask is None else \
                positions_from_mask(attention_mask).index_select(1, input_pos)  # (1 or B, T)
        lengths = _rows_alone(x, attention_mask, cache, input_pos)  # a CPU prefill of a left-padded batch
        if lengths is not None:
            h = self._decode_rows_alone(x, lengths, position_ids, cache, input_pos)
        else:
            mask = _decoder_mask(attention_mask, cache, input_pos)  # (B or 1, 1, T, S) or None
            h = self.decoder(x, position_ids, mask, cache, input_pos)  # (B, T, d)
        if logits_to_keep:
            h = h[:, -logits_to_keep:]
        logits = self.decoder.logits(h)
        loss = None if labels is None else _next_token_loss(logits, labels, attention_mask)
        return ModelOutput(logits=logits, loss=loss)

    def decode_step(self, token: torch.Tensor, filled: torch.Tensor, cache: KVCache, input_pos: torch.Tensor,
                    position_ids: torch.Tensor) -> torch.Tensor:
        """Logits (B, 1, V) of one more token per row, unchecked: a decoding loop's step, after a
        `forward` that checked the prompt. token (B, 1) goes to cache slot input_pos (1,) at RoPE
        position position_ids (B, 1), and attends over the slots `filled` (B x S, an attention
        mask over the cache) marks nonzero as holding real tokens, its own included. A sampled
        `<sound>` id is embedded as text."""
        x = self.decoder.embed_tokens(token)  # (B, 1, d)
        mask = (filled != 0)[:, None, None, :]  # (B, 1, 1, S)
        return self.decoder.logits(self.decoder(x, position_ids, mask, cache, input_pos))

    def _decode_rows_alone(self, x: torch.Tensor, lengths: list[int], position_ids: torch.Tensor,
                           cache: KVCache, input_pos: torch.Tensor) -> torch.Tensor:
        """The decoder over each left-padded row's real tokens (the last lengths[b] of row b)
        alone, written into its row of the cache: plain causal attention (the CPU kernel skips
        the masked half) and no work on padding. Padded positions come out zero."""
        h = torch.zeros_like(x)
        t = x.shape[1]
        for b, n in enumerate(lengths):
            positions = position_ids if position_ids.shape[0] == 1 else position_ids[b:b + 1]  # (1, T)
            if n:
                h[b:b + 1, t - n:] = self.decoder(x[b:b + 1, t - n:], positions[:, t - n:], None, cache.row(b),
                                                  input_pos[t - n:])
        return h

    def generate(self, **kwargs: Any) -> Any:
        """Autoregressive decoding; see `af3.generation.generate`."""
        return generate(self, **kwargs)

    # ---- checks -------------------------------------------------------------------------------

    def check_inputs(self, input_ids: Any, attention_mask: Any = None, input_features: Any = None,
                     input_features_mask: Any = None, labels: Any = None, *, position_ids: Any = None,
                     cache: Any = None, input_pos: Any = None, logits_to_keep: Any = 0) -> None:
        """TypeError/ValueError naming the input for anything `forward` cannot take as given.

        Called by `forward`, so once per `generate` call, at prefill (`decode_step` checks nothing).
        Reads a few numbers back from the device (the ids' range, the slots, with audio the frame
        count): once per call, never per step.
        """
        b, t = self._check_ids(input_ids)
        device = input_ids.device
        if cache is not None:
            if not isinstance(cache, KVCache):
                raise TypeError(f"cache must be a KVCache from model.new_cache, got {type(cache).__name__}")
            if cache.device != device:
                raise ValueError(f"cache is on {cache.device} but input_ids is on {device}")
            if cache.batch_size != b:
                raise ValueError(f"cache was made for batch size {cache.batch_size} but the input has "
                                 f"batch size {b}")
        first, last = self._check_input_pos(input_pos, t, cache, device)
        if attention_mask is not None:
            self._check_mask(attention_mask, b, t, cache, last, device)
        if position_ids is not None:
            if not isinstance(position_ids, torch.Tensor):
                raise TypeError(f"position_ids must be a torch.Tensor, got {type(position_ids).__name__}")
            if position_ids.dim() != 2 or position_ids.shape[0] not in (1, b) or position_ids.shape[1] != t:
                raise ValueError(f"position_ids must have shape ({b}, {t}), got {tuple(position_ids.shape)}")
        if not is_int(logits_to_keep) or logits_to_keep < 0:
            raise ValueError(f"logits_to_keep must be an int >= 0, got {logits_to_keep!r}")
        if labels is not None:
            _check_labels(labels, b, t, logits_to_keep)

        n_tokens = self._check_ids_values(input_ids)
        if input_features is not None:
            mel_lengths = self._check_features(input_features, input_features_mask)
            n_frames = int(pooled_length(mel_lengths).sum())
            if n_tokens != n_frames:  # checked before the encoder runs
                raise ValueError(f"Audio tokens and features mismatch: {n_tokens} <sound> tokens but "
                                 f"{n_frames} audio frames")
        elif n_tokens and first == 0:
            # Audio goes in with the first pass only: <sound> ids after it (a sampled one) are text.
            raise ValueError(f"Audio tokens and features mismatch: {n_tokens} <sound> tokens but 0 "
                             "audio frames (no input_features given)")
        elif input_features_mask is not None:
            raise ValueError("input_features_mask given without input_features")

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

    def _check_ids_values(self, input_ids: torch.Tensor) -> int:
        """Check the ids are in the vocabulary; return the <sound> count. One device sync."""
        n_audio = (input_ids == self.config.audio_token_id).sum()
        lo, hi, n_audio = torch.stack([input_ids.min().long(), input_ids.max().long(), n_audio]).tolist()
        vocab = self.config.text.vocab_size
        if lo < 0 or hi >= vocab:
            # An out-of-range id would be a device-side assert on GPU; say which id instead.
            raise ValueError(f"input_ids contains {lo if lo < 0 else hi}, outside the vocabulary "
                             f"[0, {vocab})")
        return n_audio

    @staticmethod
    def _check_input_pos(input_pos: Any, t: int, cache: KVCache | None,
                         device: torch.device) -> tuple[int, int]:
        """The first and last slot the new tokens go to."""
        if input_pos is None:
            first, last = 0, t - 1
        else:
            if cache is None:
                raise ValueError("input_pos names cache slots: it needs a cache (model.new_cache)")
            if not isinstance(input_pos, torch.Tensor):
                raise TypeError(f"input_pos must be a torch.Tensor, got {type(input_pos).__name__}")
            if input_pos.shape != (t,) or input_pos.dtype != torch.long:
                raise ValueError(f"input_pos must be an int64 tensor of shape ({t},) (one slot per new "
                                 f"token), got {input_pos.dtype} {tuple(input_pos.shape)}")
            if input_pos.device != device:
                raise ValueError(f"input_pos is on {input_pos.device} but input_ids is on {device}")
            first, last = (int(v) for v in torch.stack([input_pos.min(), input_pos.max()]).tolist())
            if first < 0:
                raise ValueError(f"input_pos holds {first}; cache slots start at 0")
        if cache is not None and last >= cache.max_len:
            raise ValueError(f"cache is full: the new tokens reach slot {last} but max_len is {cache.max_len}; "
                             "make a larger one with model.new_cache(...) or cache.grow(...)")
        return first, last

    @staticmethod
    def _check_mask(mask: Any, b: int, t: int, cache: KVCache | None, last: int, device: torch.device) -> None:
        if not isinstance(mask, torch.Tensor):
            raise TypeError(f"attention_mask must be a torch.Tensor, got {type(mask).__name__}")
        if cache is None and mask.shape != (b, t):
            raise ValueError(f"attention_mask must have shape ({b}, {t}), got {tuple(mask.shape)}")
        if cache is not None and (mask.dim() != 2 or mask.shape[0] != b
                                  or not last < mask.shape[1] <= cache.max_len):
            raise ValueError(f"attention_mask must have shape ({b}, S) with {last} < S <= {cache.max_len} "
                             f"(with a cache it covers every slot attended to, the new tokens' included), "
                             f"got {tuple(mask.shape)}")
        if mask.device != device:
            raise ValueError(f"attention_mask is on {mask.device} but input_ids is on {device}")

    def _check_features(self, features: Any, mask: Any) -> torch.Tensor:
        """Validate the features and return the valid mel length of every window (n,)."""
        if not isinstance(features, torch.Tensor):
            raise TypeError(f"input_features must be a torch.Tensor, got {type(features).__name__}")
        n_mels, n_frames = self.config.audio.num_mel_bins, N_FRAMES
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


def _decoder_mask(attention_mask: torch.Tensor | None, cache: KVCache | None,
                  input_pos: torch.Tensor) -> torch.Tensor | None:
    """The decoder's attention mask; None without an attention mask and a cache: plain causal
    attention (SDPA's fastest kernels)."""
    if cache is None and attention_mask is None:
        return None
    s = cache.max_len if attention_mask is None else attention_mask.shape[1]
    return causal_mask(attention_mask, input_pos, s)  # (B or 1, 1, T, S)


# On the CPU, a prefill from an empty cache of a left-padded batch of at least ROWS_ALONE_MIN_TOKENS
# runs row by row (see `_decode_rows_alone`): measured on 2 threads (4 layers, d=256), 8 rows of
# 256 tokens took 83 ms alone against 100 ms as a batch, 1024 tokens 384 against 829; below about
# 128 tokens the batch is faster (16 tokens: 7 ms against 15). Elsewhere one masked batch keeps
# an accelerator busy with fewer launches.
_CPU_ROWS_ALONE = True
ROWS_ALONE_MIN_TOKENS = 256


def _rows_alone(x: torch.Tensor, attention_mask: torch.Tensor | None, cache: KVCache | None,
                input_pos: torch.Tensor) -> list[int] | None:
    """Each row's count of real tokens if this call is a CPU prefill from slot 0 of a batch
    whose rows are left-padded (and run row by row); else None."""
    if not (_CPU_ROWS_ALONE and x.device.type == "cpu" and cache is not None and attention_mask is not None
            and x.shape[0] > 1 and x.shape[1] >= ROWS_ALONE_MIN_TOKENS and attention_mask.shape[1] == x.shape[1]):
        return None
    t = x.shape[1]
    real = attention_mask != 0
    n = real.sum(dim=1, keepdim=True)  # (B, 1)
    left_padded = torch.equal(real, torch.arange(t, device=x.device) >= t - n)
    fresh = int(input_pos[0]) == 0 and int(input_pos[-1]) == t - 1  # slots 0 .. T-1
    lengths = n.flatten().tolist()
    return lengths if left_padded and min(lengths) < t and fresh else None
