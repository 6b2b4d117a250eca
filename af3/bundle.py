"""The af3 bundle: model + processor + tokenizer behind a few calls.

    m = af3.load("af3-checkpoint")
    m.transcribe("speech.wav")                       # -> "the words spoken" (any length)
    m.transcribe_segments("meeting.flac")            # -> [Segment(start, end, text), ...]
    m.chat([{"role": "user", "content": [...]}])     # -> the assistant's reply
    m.generate([conversation, conversation])         # -> one reply each, batched
    session = m.start_chat("speech.wav")             # multi-turn, the audio encoded once
    session.ask("Who is speaking?")
"""

from __future__ import annotations

import copy
import dataclasses
import math
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any

import torch

from af3.audio import load_audio
from af3.chat import check_conversation, next_user_turn
from af3.checkpoint import (
    Progress,
    checkpoint_dir,
    load_model,
    quant_config,
    resolve_device,
    resolve_dtype,
)
from af3.config import AF3Config, is_int
from af3.generation import GenerationConfig, compiled_length, generate
from af3.longform import (
    CHUNK_SECONDS,
    MARGIN_SECONDS,
    Recording,
    Segment,
    chunk_sizes,
    join_text,
    known_seconds,
    transcribe_recordings,
)
from af3.processor import Processor
from af3.progress import ChunkProgress
from af3.qwen2 import KVCache
from af3.streaming import TextStreamer
from af3.tokenizer import Tokenizer
from af3.windows import check_gives_a_token

THINK_PROMPT = "Please think and reason about the input audio before you respond."


def load(path: str | os.PathLike, device: str | torch.device = "cpu",
         dtype: torch.dtype | str | None = None, *, progress: bool | Progress | None = None,
         quantize: str | None = None, group_size: int | None = None, compile: bool = False) -> AF3:
    """Load an af3 checkpoint directory into an `AF3` bundle (model in eval mode).

    `dtype` defaults to the dtype the checkpoint was saved in ("float32", "bfloat16", "float16",
    their short forms "fp32", "bf16", "fp16", or a floating torch.dtype); `device` ("cpu",
    "cuda", "cuda:1", or a torch.device) is where the weights go and must be available here.
    `progress`: True draws tensors and bytes loaded on stderr, False never; None (the default)
    draws it when stderr is a terminal and the weights are 1 GB or more (the real model:
    16.5 GB); a callable gets (tensors done, tensors, bytes done, bytes) after each tensor.
    `quantize` ("int8" or "int4", int4 with `group_size` 32, 64 or 128, default 128) quantizes the
    decoder's linear weights of a float checkpoint while reading it, one tensor at a time;
    `dtype` is then that of the parts that stay floating point. A checkpoint converted with
    `weights_convert --quantize` loads quantized without it.
    HF- and NVIDIA-layout directories are refused with the `weights_convert` command to run.
    `compile=True`: every generate call of the bundle runs its decode step through torch.compile
    (the first call compiles, and says so; the tokens are the same).
    """
    if not isinstance(compile, bool):
        raise TypeError(f"compile must be True or False, got {compile!r}")
    if not (progress is None or isinstance(progress, bool) or callable(progress)):
        raise TypeError(f"progress must be a bool, None or a callable, got {type(progress).__name__}")
    device = resolve_device(device)
    if dtype is not None:
        dtype = resolve_dtype(dtype)  # a bad argument is reported before any file is read
    qc = quant_config(quantize, group_size)
    root = checkpoint_dir(path)
    config = AF3Config.load(root / "config.json")
    dtype = resolve_dtype(config.dtype) if dtype is None else dtype

    model = load_model(root, config, device=device, dtype=dtype, progress=progress, quantize=qc)
    generation_config = GenerationConfig.load(root / "generation_config.json")
    tokenizer = Tokenizer.from_file(root / "tokenizer.json")
    processor = Processor(tokenizer, config.audio.num_mel_bins, max_length=config.text.max_position_embeddings)
    return AF3(model=model, processor=processor, tokenizer=tokenizer, config=config,
               generation_config=generation_config, compile=compile)


class AF3:
    """What `af3.load(path)` returns.

    Attributes are the parts, usable on their own exactly as with transformers:
    `model` (AudioFlamingo3), `processor`, `tokenizer`, `config`, `generation_config`.
    Keyword arguments `**gen` of every method override `generation_config` for that call
    (`max_new_tokens`, `do_sample`, `temperature`, `top_k`, `top_p`, `repetition_penalty`,
    `eos_token_id`, `pad_token_id`, `seed`, `generator`).
    """

    def __init__(self, *, model: torch.nn.Module, processor: Any, tokenizer: Any, config: AF3Config,
                 generation_config: GenerationConfig | None = None, compile: bool = False) -> None:
        self.model = model
        self.compile = compile  # run the decode step through torch.compile (see af3.generation)
        self.processor = processor
        self.tokenizer = tokenizer
        self.config = config
        if generation_config is not None:
            model.generation_config = generation_config

    @property
    def generation_config(self) -> GenerationConfig:
        """The model's: one config, so the bundle and `model.generate` cannot disagree."""
        return self.model.generation_config

    @generation_config.setter
    def generation_config(self, config: GenerationConfig) -> None:
        if not isinstance(config, GenerationConfig):
            raise TypeError(f"generation_config must be an af3 GenerationConfig, got {type(config).__name__}")
        self.model.generation_config = config

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    def __repr__(self) -> str:
        return f"AF3(device={self.device}, dtype={self.dtype})"

    # ---- transcription, chat and generation --------------------------------------------------

    def transcribe(self, audio: Any, prompt: str | Sequence[str | None] | None = None, *,
                   batch_size: int = 8, chunk_seconds: float = CHUNK_SECONDS,
                   margin_seconds: float = MARGIN_SECONDS, stream: Callable[[str], Any] | None = None,
                   progress: bool | None = None, **gen: Any) -> str | list[str]:
        """Transcribe one recording (-> str) or a list of them (-> list[str]), of any length.

        A recording is a path, URL, bytes, or an array of 16 kHz samples. It is read a block at a
        time and cut into chunks of at most `chunk_seconds` (at most 600; each cut moved back by up
        to `margin_seconds` to the quietest point), which are transcribed `batch_size` at a time
        and joined with spaces (see af3/longform.py). `prompt` defaults to "Transcribe the input
        speech."; a list gives one per recording. `stream(piece)` receives text as it is generated
        (one recording only; its chunks then run one at a time). `progress`: True draws chunks done
        and audio seconds per second on stderr, False never, None (default) when stderr is a
        terminal and there is more than one chunk.
        """
        single = not isinstance(audio, (list, tuple))
        segments = self.transcribe_segments(audio, prompt, batch_size=batch_size, chunk_seconds=chunk_seconds,
                                            margin_seconds=margin_seconds, stream=stream, progress=progress,
                                            **gen)
        texts = [join_text(s) for s in ([segments] if single else segments)]
        return texts[0] if single else texts

    def transcribe_segments(self, audio: Any, prompt: str | Sequence[str | None] | None = None, *,
                            batch_size: int = 8, chunk_seconds: float = CHUNK_SECONDS,
                            margin_seconds: float = MARGIN_SECONDS, stream: Callable[[str], Any] | None = None,
                            progress: bool | None = None,
                            **gen: Any) -> list[Segment] | list[list[Segment]]:
        """As `transcribe`, but each recording gives its chunks as `Segment(start, end, text)`,
        times in seconds (AF3 gives no word timings: a segment's times are its chunk's)."""
        _check_gen(gen, base=self.generation_config)
        single = not isinstance(audio, (list, tuple))
        clips = [audio] if single else list(audio)
        if not clips:
            raise ValueError("audio is an empty list: give at least one clip to transcribe")
        if not is_int(batch_size) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
        if stream is not None and len(clips) != 1:
            raise ValueError(f"stream needs a single clip, got {len(clips)}")
        if not (progress is None or isinstance(progress, bool)):
            raise TypeError(f"progress must be True, False or None, got {type(progress).__name__}")
        prompts = prompt if isinstance(prompt, (list, tuple)) else [prompt] * len(clips)
        if len(prompts) != len(clips):
            raise ValueError(f"got {len(prompts)} prompt(s) for {len(clips)} audio clip(s); give one prompt, "
                             "or one per clip")
        chunk_sizes(chunk_seconds, margin_seconds)  # bad values fail before any file is read
        recordings = [Recording(i, clip, p, known_seconds(clip)) for i, (clip, p) in enumerate(zip(clips, prompts))]
        expected = sum(max(1, math.ceil((r.seconds or 0) / chunk_seconds)) for r in recordings)
        reporter = ChunkProgress() if progress or (progress is None and expected > 1 and sys.stderr.isatty()) \
            else None
        started = False

        def run_batch(batch: list[torch.Tensor], batch_prompts: list[str | None]) -> list[str]:
            nonlocal started
            if stream is not None and started:
                stream(" ")  # between the chunks of a streamed recording, as join_text joins them
            started = True
            return self.transcribe_chunks(batch, batch_prompts, stream=stream, **gen)

        out: list[list[Segment]] = []
        try:
            for _, result in transcribe_recordings(run_batch, recordings, chunk_seconds=chunk_seconds,
                                                   margin_seconds=margin_seconds,
                                                   batch_size=1 if stream is not None else batch_size,
                                                   pool=1 if stream is not None else 4,
                                                   progress=reporter):
                if isinstance(result, BaseException):
                    raise result
                out.append(result)
        finally:
            if reporter is not None:
                reporter.end_line()
        return out[0] if single else out

    def transcribe_chunks(self, clips: list[Any], prompts: str | Sequence[str | None] | None = None, *,
                          stream: Callable[[str], Any] | None = None, **gen: Any) -> list[str]:
        """One generation batch: a text per clip, each clip at most 10 minutes (AF3's limit, with
        the processor's warning beyond it). The building block of `transcribe`."""
        _check_gen(gen, base=self.generation_config)
        inputs = self.processor.apply_transcription_request(list(clips), prompts)
        return self._run(inputs, stream, gen, strip_prefix=True)

    def chat(self, conversation: list[dict], *, think: bool = False,
             stream: Callable[[str], Any] | None = None, **gen: Any) -> str:
        """The assistant's reply to one conversation (HF message format, audio items included).

        `think=True` appends NVIDIA's thinking prompt to the last user turn, asking the model
        to reason before it answers (the think-mode checkpoint was trained with it).
        """
        _check_gen(gen, think, self.generation_config)
        if isinstance(conversation, (list, tuple)) and conversation and isinstance(conversation[0], (list, tuple)):
            raise TypeError("chat takes one conversation (a list of messages), got a list of conversations; "
                            "use generate() for a batch")
        if think:
            conversation = add_think_prompt(conversation)
        inputs = self.processor.apply_chat_template(conversation)
        return self._run(inputs, stream, gen)[0]

    def generate(self, conversations: list[list[dict]], *, think: bool = False, **gen: Any) -> list[str]:
        """One reply per conversation, generated as one left-padded batch."""
        _check_gen(gen, think, self.generation_config)
        if not isinstance(conversations, (list, tuple)) or not conversations or \
                not all(isinstance(c, (list, tuple)) for c in conversations):
            raise TypeError("conversations must be a non-empty list of conversations (each a list of "
                            "messages); for one conversation use chat()")
        if think:
            conversations = [add_think_prompt(c) for c in conversations]
        inputs = self.processor.apply_chat_template(list(conversations))
        return self._run(inputs, None, gen)

    def start_chat(self, audio: Any = None, *, system: str | None = None,
                   max_tokens: int | None = None) -> ChatSession:
        """A multi-turn chat about one clip that keeps its KV cache, so the audio is encoded once.

        The clip (a path, URL, bytes or array, as everywhere) is decoded here, so a bad one fails now.
        The cache grows as the chat does (doubling); `max_tokens` caps the whole chat (default:
        the model's context).
        """
        return ChatSession(self, audio, system=system, max_tokens=max_tokens)

    def check_generation(self, **gen: Any) -> GenerationConfig:
        """The generation settings a call with `**gen` would use; an unknown name or a bad value raises
        ValueError, a value of the wrong type TypeError."""
        return _check_gen(gen, base=self.generation_config)

    # ---- helpers ----------------------------------------------------------------------------

    def _run(self, inputs: Any, stream: Callable[[str], Any] | None, gen: dict,
             strip_prefix: bool = False) -> list[str]:
        inputs = inputs.to(self.device)
        streamer = TextStreamer(self.tokenizer, stream) if stream is not None else None
        out = generate(self.model, **_model_inputs(inputs), generation_config=self.generation_config,
                       streamer=streamer, vocab_limit=self.tokenizer.vocab_size, compile=self.compile, **gen)
        new = out[:, inputs["input_ids"].shape[1]:]  # (B, n_new): the prompt is returned too, as in HF
        return self.processor.batch_decode(new, skip_special_tokens=True, strip_prefix=strip_prefix)


class ChatSession:
    """Multi-turn chat whose KV cache lives across turns.

    Each turn appends the user's text (and the closing of the previous reply) as tokens after
    what is already cached, so only the new tokens are run: the audio is encoded on the first
    turn only. The cache is made for the first turn and grows (at least doubling, keeping what
    it holds) when a later turn needs more room. `history` holds the conversation in HF
    message format.
    """

    def __init__(self, bundle: AF3, audio: Any = None, *, system: str | None = None,
                 max_tokens: int | None = None) -> None:
        limit = bundle.config.text.max_position_embeddings
        if max_tokens is None:
            max_tokens = limit
        if not is_int(max_tokens) or max_tokens < 1:
            raise ValueError(f"max_tokens must be a positive int, got {max_tokens!r}")
        if max_tokens > limit:  # not cut to the context without a word
            raise ValueError(f"max_tokens {max_tokens} exceeds the model's context of {limit} tokens")
        if system is not None and not isinstance(system, str):
            raise TypeError(f"system must be a string or None, got {type(system).__name__}")
        self.bundle = bundle
        self.audio = audio  # as given (history shows it so)
        self._clip = None if audio is None else load_audio(audio)  # a bad file fails here, not at ask()
        if self._clip is not None:  # nor one too short to be heard
            check_gives_a_token(self._clip.shape[0], audio if isinstance(audio, (str, os.PathLike)) else "the audio")
        self.max_tokens = max_tokens
        self.history: list[dict] = [] if system is None else [{"role": "system", "content": system}]
        # (1, n): every token so far, the last reply included. The cache holds all but the last of
        # them (the last generated token is never fed back), so each turn re-feeds from there.
        self.ids: torch.Tensor | None = None
        self.cache: KVCache | None = None  # made by the first turn, sized for it

    def ask(self, text: str, *, think: bool = False, stream: Callable[[str], Any] | None = None,
            **gen: Any) -> str:
        """The assistant's reply to `text`, given everything said so far.

        A turn that fails (bad settings, a full cache, an exception from `stream`, Ctrl-C) leaves
        the chat as it was: its history and cache hold only the turns that completed.
        """
        if not isinstance(text, str):
            raise TypeError(f"text must be a string, got {type(text).__name__}")
        settings = _check_gen(gen, think, self.bundle.generation_config)  # before anything changes
        if think:
            text = f"{text} {THINK_PROMPT}" if text else THINK_PROMPT
        bundle, processor = self.bundle, self.bundle.processor
        features: dict[str, torch.Tensor] = {}
        if self.ids is None:
            content: list[dict] = [{"type": "text", "text": text}]
            sent = content
            if self.audio is not None:
                content = [{"type": "audio", "audio": self.audio}, *content]
                sent = [{"type": "audio", "audio": self._clip}, *sent]  # decoded once, at start_chat
            user = {"role": "user", "content": content}
            inputs = processor.apply_chat_template(self.history + [{"role": "user", "content": sent}])
            inputs = inputs.to(bundle.device)
            ids = inputs["input_ids"]
            features = {k: inputs[k] for k in ("input_features", "input_features_mask") if k in inputs}
        else:
            # Close the previous reply as the chat template does, then open the next turns.
            turn_ids = bundle.tokenizer.encode(next_user_turn(text))
            if processor.audio_token_id in turn_ids:  # the model would take it as a plain token, silently
                raise ValueError(f"text holds the audio placeholder {processor.audio_token!r}; a chat's audio is "
                                 "given once, to start_chat, and its first turn carries it")
            new = torch.tensor([turn_ids], device=self.ids.device)
            ids = torch.cat([self.ids, new], dim=1)  # (1, n + new): once per turn, not per token
            user = {"role": "user", "content": text}
        need = ids.shape[1] + settings.max_new_tokens
        if need > self.max_tokens:
            raise ValueError(f"this chat holds {ids.shape[1]} tokens and max_new_tokens={settings.max_new_tokens}, "
                             f"beyond its limit of {self.max_tokens} tokens; start a new chat "
                             "(start_chat(max_tokens=...)) or lower max_new_tokens")
        streamer = TextStreamer(bundle.tokenizer, stream) if stream is not None else None
        if self.cache is None:
            size = compiled_length(need, self.max_tokens) if bundle.compile else need  # compiled: a few lengths
            self.cache = bundle.model.new_cache(1, size, dtype=bundle.dtype, device=bundle.device)
        elif need > self.cache.max_len:
            self.cache.grow(min(max(need, 2 * self.cache.max_len), self.max_tokens))
        # A failed turn leaves self.ids as it was; what it wrote past them is written again next time.
        cached = 0 if self.ids is None else self.ids.shape[1] - 1
        out = generate(bundle.model, ids, **features, generation_config=settings, streamer=streamer,
                       cache=self.cache, cached=cached, vocab_limit=bundle.tokenizer.vocab_size,
                       compile=bundle.compile, **{k: v for k, v in gen.items() if k in ("seed", "generator")})
        reply_ids = out[0, ids.shape[1]:].tolist()
        eos = set(settings.eos_token_id)
        if reply_ids and reply_ids[-1] in eos:
            reply_ids = reply_ids[:-1]  # the template closes the turn itself, next time
        self.ids = torch.cat([ids, torch.tensor([reply_ids], dtype=ids.dtype, device=ids.device)], dim=1)
        reply = bundle.tokenizer.decode(reply_ids, skip_special_tokens=True)
        self.history += [user, {"role": "assistant", "content": reply}]
        return reply


def add_think_prompt(conversation: list[dict]) -> list[dict]:
    """A copy of `conversation` with THINK_PROMPT appended to the text of its last user turn."""
    check_conversation(conversation)  # the usual errors for a malformed one
    conversation = copy.deepcopy(list(conversation))
    users = [m for m in conversation if isinstance(m, dict) and m.get("role") == "user"]
    if not users:
        raise ValueError("think=True needs a user message to append the thinking prompt to")
    last = users[-1]
    content = last.get("content")
    if isinstance(content, str):
        last["content"] = f"{content} {THINK_PROMPT}" if content else THINK_PROMPT
    elif isinstance(content, list):
        texts = [item for item in content if isinstance(item, dict) and item.get("type") == "text"]
        if texts:
            texts[-1]["text"] = f"{texts[-1]['text']} {THINK_PROMPT}" if texts[-1].get("text") else THINK_PROMPT
        else:
            content.append({"type": "text", "text": THINK_PROMPT})
    else:
        raise TypeError(f"the last user message's content must be a string or a list, got {type(content).__name__}")
    return conversation


def _model_inputs(inputs: Any) -> dict:
    keys = ("input_ids", "attention_mask", "input_features", "input_features_mask")
    return {k: inputs[k] for k in keys if k in inputs}


_RNG_ARGS = ("seed", "generator")


def _check_gen(gen: dict, think: Any = False, base: GenerationConfig | None = None) -> GenerationConfig:
    """Refuse unknown keywords and bad settings before any work; `base` with `gen` applied."""
    if not isinstance(think, bool):
        raise TypeError(f"think must be True or False, got {think!r}")
    known = {f.name for f in dataclasses.fields(GenerationConfig)}
    unknown = sorted(set(gen) - known - set(_RNG_ARGS))
    if unknown:
        hint = " (pass a function as stream= to receive text as it comes)" if "streamer" in unknown else ""
        raise ValueError(f"unknown generation argument(s) {unknown}; known: {sorted(known | set(_RNG_ARGS))}"
                         f"{hint}")
    base = base if base is not None else GenerationConfig()
    return base.replace(**{k: v for k, v in gen.items() if k not in _RNG_ARGS})
