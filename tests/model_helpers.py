"""Tiny transformers AudioFlamingo3 models and their af3 twins, for parity tests.

`tiny_hf_model(...)` builds a random `AudioFlamingo3ForConditionalGeneration` (fp32, eval) and
`hf_to_af3_model(hf)` moves its tensors into `af3.model.AudioFlamingo3` through the same name
map the converter uses (`weights_convert.names.hf_to_af3`) and a strict `load_state_dict`.
"""

from __future__ import annotations

import torch

from af3.config import AF3Config
from af3.model import AudioFlamingo3
from weights_convert.hf_config import config_from_hf
from weights_convert.names import hf_to_af3

TINY_VOCAB = 160
TINY_AUDIO_ID = 157  # the <sound> id of the tiny configs
# The frontend is fixed at 3000 mel frames per window, so max_source_positions stays 1500.
TINY_AUDIO = {"num_mel_bins": 128, "d_model": 16, "encoder_layers": 2, "encoder_attention_heads": 2,
              "encoder_ffn_dim": 32, "max_source_positions": 1500}
TINY_TEXT = {"vocab_size": TINY_VOCAB, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
             "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 4096,
             "rms_norm_eps": 1e-6, "rope_theta": 10000.0, "tie_word_embeddings": False}


def tiny_hf_config(audio: dict | None = None, **text_overrides):
    """A small transformers AudioFlamingo3Config; keyword arguments override text_config keys."""
    from transformers import AudioFlamingo3Config

    text = dict(TINY_TEXT, **text_overrides)
    return AudioFlamingo3Config(audio_config=dict(TINY_AUDIO, **(audio or {})), text_config=text,
                                audio_token_id=TINY_AUDIO_ID)


def tiny_hf_model(audio: dict | None = None, seed: int = 0, **text_overrides):
    """A random tiny AudioFlamingo3ForConditionalGeneration in fp32 and eval mode.

    Every tensor gets noise (HF's init leaves biases at 0 and norms at 1, which would hide
    mistakes). With tie_word_embeddings=True, lm_head is set equal to the embedding, as in a
    tied checkpoint (transformers keeps AF3's lm_head as a separate tensor).
    """
    from transformers import AudioFlamingo3ForConditionalGeneration

    torch.manual_seed(seed)
    model = AudioFlamingo3ForConditionalGeneration(tiny_hf_config(audio, **text_overrides))
    model = model.float().eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
        if model.config.text_config.tie_word_embeddings:
            model.lm_head.weight.copy_(model.model.language_model.embed_tokens.weight)
    return model


def af3_config_of(hf_model) -> AF3Config:
    return config_from_hf(hf_model.config.to_dict())


def af3_model_sharing(hf_model) -> AudioFlamingo3:
    """An af3 AudioFlamingo3 over `hf_model`'s own tensors, for benchmarks at large sizes: no
    copy but of q, k and v, which af3 holds merged (joined into a new tensor)."""
    state = {hf_to_af3(name): t for name, t in hf_model.state_dict().items()}
    with torch.device("meta"):
        model = AudioFlamingo3(af3_config_of(hf_model))
    model.load_state_dict(state, strict=True, assign=True)
    return model.eval()


def hf_to_af3_model(hf_model) -> AudioFlamingo3:
    """An af3 AudioFlamingo3 holding copies of `hf_model`'s weights (strict load)."""
    config = af3_config_of(hf_model)
    state = {}
    for name, tensor in hf_model.state_dict().items():
        ours = hf_to_af3(name)
        if ours in state:
            raise ValueError(f"{name} maps to {ours}, which is already taken")
        state[ours] = tensor.detach().clone()
    if config.text.tie_word_embeddings:
        head = state.pop("decoder.lm_head.weight")
        if not torch.equal(head, state["decoder.embed_tokens.weight"]):
            raise ValueError("tied model: lm_head differs from embed_tokens")
    model = AudioFlamingo3(config)
    model.load_state_dict(state, strict=True)
    return model.float().eval()
