"""The settings files transformers 5 writes beside AF3's weights, and what the converter does with each field.

`save_pretrained` of `AudioFlamingo3ForConditionalGeneration` and `AudioFlamingo3Processor`
writes config.json, generation_config.json, tokenizer.json, tokenizer_config.json,
processor_config.json (the WhisperFeatureExtractor's settings nested in it) and
chat_template.jinja. Every field there is either read (hf_config.py, af3/generation.py, af3/tokenizer.py),
known not to change af3's numbers (bookkeeping such as `transformers_version`, dropout that
only acts in training), or refused here by name when it holds a value af3 would not honour.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from af3.processor import DEFAULT_TRANSCRIPTION_PROMPT
from af3.tokenizer import EOS_TOKEN, PAD_TOKEN, Tokenizer

# The chat template nvidia/audio-flamingo-3-hf ships; af3/chat.py writes the same strings by hand.
AF3_CHAT_TEMPLATE = (
    "{% if messages[0]['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "{% endif %}{% for m in messages if m['content'] is not none %}<|im_start|>{{ m['role'] }}\n"
    "{% if m['content'] is string %}{{ m['content'] }}{% else %}{% set audio = namespace(found=False) %}"
    "{% set text_buf = namespace(v='') %}{% for c in m['content'] %}"
    "{% if c.get('type') == 'audio' or 'audio' in c %}{% set audio.found = True %}"
    "{% elif c.get('type') == 'text' or 'text' in c %}{% set text_buf.v = text_buf.v + c['text'] %}"
    "{% endif %}{% endfor %}{% if audio.found %}{{ '<sound>' }}{% endif %}{{ text_buf.v }}{% endif %}"
    "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# generation_config.json: keys that would change what `generate` returns, with the value that
# leaves it unchanged. Those af3 reads (sampling, eos, pad, max_new_tokens) are not listed.
_GENERATION_NO_OP = {
    "num_beams": 1, "num_beam_groups": 1, "min_length": 0, "min_new_tokens": None, "no_repeat_ngram_size": 0,
    "encoder_no_repeat_ngram_size": 0, "typical_p": 1.0, "epsilon_cutoff": 0.0, "eta_cutoff": 0.0,
    "min_p": None, "top_h": None, "encoder_repetition_penalty": 1.0, "bad_words_ids": None,
    "force_words_ids": None, "suppress_tokens": None, "begin_suppress_tokens": None,
    "forced_bos_token_id": None, "forced_eos_token_id": None, "sequence_bias": None, "guidance_scale": None,
    "renormalize_logits": False, "penalty_alpha": None, "diversity_penalty": 0.0,
    "exponential_decay_length_penalty": None, "stop_strings": None, "num_return_sequences": 1,
    "constraints": None, "token_healing": False, "dola_layers": None, "watermarking_config": None,
}
_GENERATION_READ = {"do_sample", "temperature", "top_k", "top_p", "repetition_penalty", "max_new_tokens",
                    "eos_token_id", "pad_token_id", "bos_token_id"}
# Bookkeeping, output formats, caches and speed settings: the tokens generated do not depend on
# them. `max_length` is HF's cap on prompt + reply; af3 caps the reply (max_new_tokens) instead.
_GENERATION_IGNORED = {
    "transformers_version", "_from_model_config", "use_cache", "cache_implementation", "cache_config",
    "max_cache_len", "compile_config", "disable_compile", "low_memory", "output_attentions",
    "output_hidden_states", "output_scores", "output_logits", "return_dict_in_generate", "max_time",
    "remove_invalid_values", "length_penalty", "early_stopping", "decoder_start_token_id", "max_length",
    "prefill_chunk_size", "is_assistant", "num_assistant_tokens", "num_assistant_tokens_schedule",
    "assistant_confidence_threshold", "assistant_lookbehind", "target_lookbehind", "max_matching_ngram_size",
    "prompt_lookup_num_tokens", "assistant_early_exit", "assistant_ensemble_weight", "speculation_type",
    "use_mtp", "continuous_batching_config",
}


class HFFileError(ValueError):
    """A field of an HF settings file that af3 would not honour."""


def check_generation_config(d: dict, where: str) -> None:
    """Refuse, by name, generation settings that would change HF's output and that af3 does not apply."""
    problems = []
    for key, value in d.items():
        if key in _GENERATION_READ or key in _GENERATION_IGNORED:
            continue
        if key not in _GENERATION_NO_OP:
            problems.append(f"{key}={json.dumps(value)} (unknown to af3)")
        elif value is not None and value != _GENERATION_NO_OP[key]:
            problems.append(f"{key}={json.dumps(value)} (af3 implements only {_GENERATION_NO_OP[key]!r})")
    if problems:
        raise HFFileError(f"{where}: settings af3's generate does not apply: {', '.join(problems)}; remove them "
                          "or set them to their no-op value")


def check_text_config(text: dict, where: str) -> None:
    """config.json's text_config: every layer must be full attention (Qwen2's sliding window is not implemented)."""
    layer_types = text.get("layer_types")
    if layer_types is not None and (not isinstance(layer_types, list)
                                    or any(t != "full_attention" for t in layer_types)):
        raise HFFileError(f"{where}: text_config.layer_types is {json.dumps(layer_types)[:200]}; af3 implements "
                          "only 'full_attention' layers")


def training_only_settings(config: dict) -> list[str]:
    """config.json's nonzero dropout settings: they act only in training, and af3 has no dropout."""
    found = []
    for part in ("audio_config", "text_config"):
        sub = config.get(part) or {}
        for key in ("dropout", "attention_dropout", "activation_dropout", "layerdrop"):
            value = sub.get(key) if isinstance(sub, dict) else None
            if isinstance(value, (int, float)) and value:
                found.append(f"{part}.{key}={value}")
    return found


def _token_text(value: Any) -> Any:
    """tokenizer_config.json writes a token as its text, or as {"content": text, ...} (older files)."""
    return value.get("content") if isinstance(value, dict) else value


def check_tokenizer_config(d: dict, where: str, *, hf_layout: bool = True) -> None:
    """tokenizer_config.json: no tokens added around texts, plain decoding; for the HF layout also the
    pad / eos tokens af3 uses and AF3's chat template (NVIDIA's original llm/ folder keeps Qwen2's own
    settings there, which no AF3 processor reads)."""
    for key, want in (("pad_token", PAD_TOKEN), ("eos_token", EOS_TOKEN)) if hf_layout else ():
        if key in d and _token_text(d[key]) != want:
            raise HFFileError(f"{where}: {key} is {json.dumps(d[key])}; af3 uses {want!r}")
    for key in ("add_bos_token", "add_eos_token", "clean_up_tokenization_spaces"):
        if d.get(key):
            raise HFFileError(f"{where}: {key} is true; af3's tokenizer does not do that (set it to false)")
    if hf_layout and "chat_template" in d:
        check_chat_template(d["chat_template"], where)


def check_chat_template(template: Any, where: str) -> None:
    """af3 writes AF3's prompts by hand (af3/chat.py): a checkpoint asking for other prompts is refused."""
    if not isinstance(template, str) or template.strip() != AF3_CHAT_TEMPLATE.strip():
        raise HFFileError(f"{where}: the chat template is not AF3's; af3 builds AF3's prompts itself "
                          "(af3/chat.py) and would not follow this one")


def check_processor_config(d: dict, where: str) -> None:
    """processor_config.json (or preprocessor_config.json): a Whisper frontend as af3 computes it, AF3's prompt."""
    audio_token = d.get("audio_token", "<sound>")
    if audio_token != "<sound>":
        raise HFFileError(f"{where}: audio_token is {audio_token!r}; af3 uses '<sound>'")
    prompt = d.get("default_transcription_prompt", DEFAULT_TRANSCRIPTION_PROMPT)
    if prompt != DEFAULT_TRANSCRIPTION_PROMPT:
        raise HFFileError(f"{where}: default_transcription_prompt is {prompt!r}; af3's transcription requests "
                          f"use {DEFAULT_TRANSCRIPTION_PROMPT!r}")
    fe = d.get("feature_extractor", d)
    if not isinstance(fe, dict):
        raise HFFileError(f"{where}: feature_extractor must be an object, got {type(fe).__name__}")
    kind = fe.get("feature_extractor_type", "WhisperFeatureExtractor")
    if kind != "WhisperFeatureExtractor":
        raise HFFileError(f"{where}: feature_extractor_type is {kind!r}; af3 computes WhisperFeatureExtractor's "
                          "log-mel")
    for key, want in (("dither", 0.0), ("padding_value", 0.0)):
        if fe.get(key, want) != want:
            raise HFFileError(f"{where}: {key} is {fe[key]!r}; af3's log-mel uses {want}")
    # Its sizes (sampling_rate, n_fft, hop_length, ...) are checked by hf_config.check_frontend.


def check_tokenizer(path: Path) -> Tokenizer:
    """Build af3's Tokenizer from the file to be copied, so a bad one fails now and not at af3.load."""
    return Tokenizer.from_file(path)
