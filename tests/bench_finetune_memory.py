"""Memory of a LoRA fine-tuning step: af3.finetune.memory_estimate at AF3's real dimensions, and the
same estimate next to what the tiny model actually keeps for its backward pass (measured with
torch.autograd.graph.saved_tensors_hooks: bytes of every distinct non-parameter tensor saved).

    .venv/bin/python tests/bench_finetune_memory.py
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch

from af3 import finetune, lora
from af3.model import AudioFlamingo3
from weights_convert.hf_config import config_from_hf

REAL = {  # nvidia/audio-flamingo-3-hf: Whisper-large-v3 encoder, Qwen2.5-7B decoder
    "audio_config": {"d_model": 1280, "encoder_layers": 32, "encoder_attention_heads": 20,
                     "encoder_ffn_dim": 5120, "num_mel_bins": 128, "max_source_positions": 1500},
    "text_config": {"model_type": "qwen2", "vocab_size": 151672, "hidden_size": 3584,
                    "intermediate_size": 18944, "num_hidden_layers": 28, "num_attention_heads": 28,
                    "num_key_value_heads": 4, "max_position_embeddings": 32768, "rope_theta": 1e6,
                    "rms_norm_eps": 1e-6, "tie_word_embeddings": False},
    "audio_token_id": 151669, "model_type": "audioflamingo3",
}


def saved_bytes(model: AudioFlamingo3, batch: dict) -> int:
    """Bytes of the distinct non-parameter tensors autograd keeps from one forward pass."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        ptr = t.untyped_storage().data_ptr()
        if ptr not in params:
            seen[ptr] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(**batch).loss
    loss.backward()
    return sum(seen.values())


def main() -> None:
    with torch.device("meta"):
        real = AudioFlamingo3(config_from_hf(REAL))
    print("AF3 (8.3 B), LoRA r=8 on the decoder's q k v o gate up down, 30 s of audio + 100 text tokens, "
          "bf16 weights and activations:")
    for checkpointing in (False, True):
        e = finetune.memory_estimate(real, checkpointing=checkpointing)
        print(f"  checkpointing={checkpointing!s:5}  " + "  ".join(f"{k} {finetune.gib(v)}" for k, v in e.items()))

    from tests.model_helpers import hf_to_af3_model, tiny_hf_model
    from tests.test_model import make_batch

    model = hf_to_af3_model(tiny_hf_model(seed=0)).train()
    lora.add_lora(model, rank=8, alpha=16)
    batch = make_batch([[3000]], padding_side="right", text=(50, 50))  # 30 s of audio, 100 text tokens
    print("tiny model (fp32 activations), one conversation of 30 s + 100 tokens: activations kept for backward "
          "(measured: what the forward pass saves; with checkpointing one layer's recomputation adds to it "
          "during the backward pass, which the estimate includes)")
    for checkpointing in (False, True):
        model.encoder.gradient_checkpointing = model.decoder.gradient_checkpointing = checkpointing
        measured = saved_bytes(model, batch)
        est = finetune.memory_estimate(model, checkpointing=checkpointing, activation_bytes=4)["activations"]
        print(f"  checkpointing={checkpointing!s:5}  measured {measured / 2**20:.2f} MiB  "
              f"estimate {est / 2**20:.2f} MiB")


if __name__ == "__main__":
    main()
