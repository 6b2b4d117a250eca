"""Tiny random AF3 checkpoints in the layouts weights_convert reads, saved by transformers.

`write_tiny_hf_checkpoint` saves a randomly initialised `AudioFlamingo3ForConditionalGeneration`
and an `AudioFlamingo3Processor` (around tests/tiny_tokenizer.py's tokenizer) with transformers'
`save_pretrained`: config.json, generation_config.json, model.safetensors, tokenizer.json,
tokenizer_config.json, processor_config.json and chat_template.jinja, exactly as a user's
fine-tuned checkpoint comes out of transformers 5. `write_tiny_nvidia_checkpoint` rearranges the
same tensors into NVIDIA's original `llm/`, `sound_tower/`, `sound_mm_projector/` folders.
"""

from __future__ import annotations

import functools
import json
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from tests.tiny_tokenizer import (
    TINY_AUDIO_TOKEN_ID,
    TINY_EOS_TOKEN_ID,
    TINY_PAD_TOKEN_ID,
    TINY_TOKEN_IDS,
    TINY_VOCAB_SIZE,
    write_tiny_tokenizer,
)
from weights_convert.hf_files import (
    AF3_CHAT_TEMPLATE,  # what nvidia/audio-flamingo-3-hf ships
)

TINY_AUDIO = {"num_mel_bins": 128, "d_model": 32, "encoder_layers": 2, "encoder_attention_heads": 4,
                  "encoder_ffn_dim": 64, "max_source_positions": 1500}
TINY_TEXT = {"hidden_size": 48, "intermediate_size": 96, "num_hidden_layers": 2, "num_attention_heads": 4,
                 "num_key_value_heads": 2, "max_position_embeddings": 512, "rms_norm_eps": 1e-6,
                 "rope_theta": 10000.0}


def tiny_hf_model(*, tie_word_embeddings: bool = False, seed: int = 0, **text_overrides):
    """A random tiny transformers AudioFlamingo3ForConditionalGeneration (float32, eval mode)."""
    from transformers import (
        AudioFlamingo3Config,
        AudioFlamingo3ForConditionalGeneration,
    )

    text = dict(TINY_TEXT, vocab_size=TINY_VOCAB_SIZE, tie_word_embeddings=tie_word_embeddings)
    text.update(text_overrides)
    config = AudioFlamingo3Config(audio_config=dict(TINY_AUDIO), text_config=text,
                                  audio_token_id=TINY_AUDIO_TOKEN_ID)
    torch.manual_seed(seed)
    model = AudioFlamingo3ForConditionalGeneration(config).eval()
    with torch.no_grad():
        # Random init gives zero biases and unit norms; make every tensor matter for parity.
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
        if tie_word_embeddings:  # transformers keeps a separate lm_head; a tied model's equals the embedding
            model.lm_head.weight.copy_(model.model.language_model.embed_tokens.weight)
    return model


def _hf_names(state: dict[str, torch.Tensor], style: str) -> dict[str, torch.Tensor]:
    """In-memory names are the new style; the old style is what transformers 4.x wrote."""
    if style == "new":
        return dict(state)
    if style != "old":
        raise ValueError(f"style must be 'old' or 'new', got {style!r}")
    out = {}
    for k, v in state.items():
        if k == "lm_head.weight":
            k = "language_model.lm_head.weight"
        elif k.startswith("model.language_model."):
            k = "language_model.model." + k[len("model.language_model."):]
        else:
            k = k.removeprefix("model.")
        out[k] = v
    return out


def write_safetensors(directory: Path, tensors: dict[str, torch.Tensor], shards: int = 1) -> None:
    """`model.safetensors`, or `shards` files plus `model.safetensors.index.json`."""
    tensors = {k: v.detach().contiguous() for k, v in tensors.items()}
    if shards == 1:
        save_file(tensors, str(directory / "model.safetensors"), metadata={"format": "pt"})
        return
    names = sorted(tensors)
    weight_map = {}
    for i in range(shards):
        part = names[i::shards]
        file = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        save_file({k: tensors[k] for k in part}, str(directory / file), metadata={"format": "pt"})
        weight_map.update({k: file for k in part})
    total = sum(v.numel() * v.element_size() for v in tensors.values())
    (directory / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))


def write_tiny_hf_checkpoint(directory: str | Path, *, style: str = "old", shards: int = 1,
                             tie_word_embeddings: bool = False, seed: int = 0,
                             dtype: torch.dtype = torch.float32, generation: dict | None = None,
                             **text_overrides) -> Path:
    """Write a tiny random HF-layout AF3 checkpoint into `directory`; returns its path.

    `generation` updates the generation config (AF3's sampling defaults); keyword arguments
    override text_config keys.

    config.json, generation_config.json and the processor files are written by transformers'
    own `save_pretrained`. With style="new" and one shard, so is model.safetensors; otherwise
    the same tensors are renamed to transformers 4.x's names ("old") or split into `shards`
    files here, to test the layouts transformers no longer writes.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    model = tiny_hf_model(tie_word_embeddings=tie_word_embeddings, seed=seed, **text_overrides)
    model.generation_config = tiny_generation_config()
    model.generation_config.update(**(generation or {}))
    if style == "new" and shards == 1:
        model.to(dtype).save_pretrained(str(directory))
    else:
        model.config.dtype = dtype
        model.config.save_pretrained(str(directory))
        model.generation_config.save_pretrained(str(directory))
        state = {k: v.to(dtype) for k, v in model.state_dict().items()}
        write_safetensors(directory, _hf_names(state, style), shards)
    tiny_hf_processor().save_pretrained(str(directory))
    return directory


def tiny_generation_config():
    """AF3's sampling defaults (nvidia/audio-flamingo-3-hf's generation_config.json), tiny ids."""
    from transformers import GenerationConfig

    return GenerationConfig(do_sample=True, temperature=0.7, top_k=20, top_p=0.8, repetition_penalty=1.05,
                            eos_token_id=[TINY_EOS_TOKEN_ID, TINY_PAD_TOKEN_ID], pad_token_id=TINY_PAD_TOKEN_ID,
                            bos_token_id=TINY_PAD_TOKEN_ID)


@functools.cache
def tiny_hf_processor():
    """transformers' AudioFlamingo3Processor around the tiny tokenizer (built once per process).

    Its tokenizer is what `AutoTokenizer` makes of tests/tiny_tokenizer.py's files, so the
    tokenizer.json that `save_pretrained` writes is transformers 5's rewrite of it (with a
    TemplateProcessing post-processor), as a fine-tuned AF3's is.
    """
    from transformers import (
        AudioFlamingo3Processor,
        AutoTokenizer,
        WhisperFeatureExtractor,
    )

    with tempfile.TemporaryDirectory() as tmp:
        write_tiny_tokenizer(tmp)
        tokenizer = AutoTokenizer.from_pretrained(tmp)
    return AudioFlamingo3Processor(feature_extractor=WhisperFeatureExtractor(feature_size=128),
                                   tokenizer=tokenizer, chat_template=AF3_CHAT_TEMPLATE)


def write_tiny_nvidia_checkpoint(directory: str | Path, hf_checkpoint: str | Path) -> Path:
    """Rearrange the tensors of a tiny HF checkpoint into NVIDIA's original layout."""
    directory, hf_checkpoint = Path(directory), Path(hf_checkpoint)
    config = json.loads((hf_checkpoint / "config.json").read_text())
    tensors = {}
    for file in sorted(hf_checkpoint.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as f:
            tensors.update({k: f.get_tensor(k) for k in f.keys()})  # noqa: SIM118 (not iterable)
    tensors = _hf_names(tensors, "old") if any(k.startswith("model.") for k in tensors) else tensors

    parts: dict[str, dict[str, torch.Tensor]] = {"llm": {}, "sound_tower": {}, "sound_mm_projector": {}}
    for k, v in tensors.items():
        if k.startswith("language_model."):
            parts["llm"][k[len("language_model."):]] = v
        elif k.startswith("audio_tower."):
            parts["sound_tower"][k[len("audio_tower."):]] = v
        else:
            linear = k.removeprefix("multi_modal_projector.")
            index = {"linear_1": "layers.0", "linear_2": "layers.2"}[linear.split(".")[0]]
            parts["sound_mm_projector"][index + "." + linear.split(".", 1)[1]] = v
    configs = {"llm": config["text_config"], "sound_tower": config["audio_config"],
               "sound_mm_projector": {"mm_projector_type": "mlp_downsample"}}
    for part, part_tensors in parts.items():
        (directory / part).mkdir(parents=True, exist_ok=True)
        write_safetensors(directory / part, part_tensors)
        (directory / part / "config.json").write_text(json.dumps(configs[part], indent=2))
    shutil.copyfile(hf_checkpoint / "tokenizer.json", directory / "llm" / "tokenizer.json")
    shutil.copyfile(hf_checkpoint / "generation_config.json", directory / "llm" / "generation_config.json")
    # NVIDIA's top-level config.json is a VILA one; weights_convert reads the part folders only.
    (directory / "config.json").write_text(json.dumps({"model_type": "llava_llama"}))
    return directory


def write_tiny_af3_checkpoint(root: str | Path, *, max_new_tokens: int, **hf_kwargs) -> Path:
    """A tiny HF checkpoint at root/hf, converted to root/ckpt with weights_convert, its default
    `max_new_tokens` capped (random weights rarely say eos); embedding rows = tokenizer ids, so
    every generated id decodes. Returns root/ckpt."""
    from af3.generation import GenerationConfig
    from weights_convert.convert import convert

    root = Path(root)
    write_tiny_hf_checkpoint(root / "hf", vocab_size=max(TINY_TOKEN_IDS.values()) + 1, **hf_kwargs)
    convert(root / "hf", root / "ckpt")
    config = root / "ckpt" / "generation_config.json"
    GenerationConfig.load(config).replace(max_new_tokens=max_new_tokens).save(config)
    return root / "ckpt"
