"""Fine-tuning AF3 on a JSONL manifest of conversations: LoRA adapters or chosen parts, AdamW.

    manifest line  {"messages": [{"role": "user", "content": [{"type": "audio", "path": "a.wav"},
                                 {"type": "text", "text": "..."}]},
                                {"role": "assistant", "content": "the reply to learn"}]}
      └─ every line checked before training (clips <= 10 min, prompt within the context, a reply to learn)
      └─ a step: global batch = batch_size x grad_accum x world_size conversations, right-padded,
         labels on the assistant turns only; loss = sum of token losses / tokens in the global batch
      └─ AdamW, linear warm-up then cosine decay to 0; gradient clipping
      └─ checkpoint-NNNNNN/ every N steps and final/: adapter (PEFT format) or trained parts,
         optimizer state and step, all safetensors + JSON, so --resume continues exactly

Data parallel under torchrun (gloo on CPU, nccl on CUDA). Audio paths in a manifest are
relative to the manifest's folder. Nothing here needs a library beyond torch and af3.
"""

from __future__ import annotations

import math
import os
import re
import time
from collections.abc import Iterator
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn

from af3 import lora
from af3.audio import load_audio
from af3.chat import AUDIO_KEYS, check_conversation
from af3.config import is_int, is_number
from af3.frontend import MAX_SECONDS, SAMPLING_RATE
from af3.jsonfile import check_utf8, parse_json
from af3.processor import IGNORE_INDEX

PARTS = ("encoder", "projector", "decoder")  # what --train may fine-tune in full
STATE_FILE = "trainer_state.json"
OPTIMIZER_FILE = "optimizer.safetensors"
PARTS_FILE = "trained_parts.safetensors"  # full fine-tuning: the trained tensors, af3 names
_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")


class DivergedError(ValueError):
    """The training loss became nan or inf."""


class ManifestError(ValueError):
    """One or more manifest lines cannot be trained on; the message lists every one with its line."""


@dataclass
class TrainConfig:
    """Everything that decides the result of a run (saved with every checkpoint)."""

    train: tuple[str, ...] = ("lora",)  # "lora" and/or parts from PARTS trained in full
    lora_rank: int = 8
    lora_alpha: float = 16.0
    lora_dropout: float = 0.05
    lora_targets: tuple[str, ...] = ("decoder",)  # groups of af3.lora.TARGET_GROUPS or module patterns
    batch_size: int = 1  # conversations per micro-batch per process
    grad_accum: int = 1
    steps: int = 100
    lr: float = 1e-4
    warmup_steps: int = 0
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0  # 0: no clipping
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("lora_rank", "batch_size", "grad_accum", "steps"):
            value = getattr(self, name)
            if not is_int(value) or value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {value!r}")
        for name in ("lr", "weight_decay", "max_grad_norm", "lora_alpha", "lora_dropout"):
            value = getattr(self, name)
            if not is_number(value):  # nan or inf would train to nan weights, and save them
                raise ValueError(f"{name} must be a finite number, got {value!r}")
        if not self.lr > 0 or self.weight_decay < 0 or self.max_grad_norm < 0:
            raise ValueError("lr must be > 0 and weight_decay, max_grad_norm >= 0, got "
                             f"{self.lr}, {self.weight_decay}, {self.max_grad_norm}")
        if not is_int(self.warmup_steps) or self.warmup_steps < 0:
            raise ValueError(f"warmup_steps must be an int >= 0, got {self.warmup_steps!r}")
        self.train, self.lora_targets = tuple(self.train), tuple(self.lora_targets)
        unknown = [t for t in self.train if t != "lora" and t not in PARTS]
        if unknown or not self.train:
            raise ValueError(f"train must name 'lora' and/or parts of {PARTS}, got {list(self.train)}")

    def targets(self) -> tuple[str, ...]:
        """The LoRA target patterns: groups expanded."""
        return tuple(p for t in self.lora_targets for p in lora.TARGET_GROUPS.get(t, (t,)))


@dataclass
class Example:
    line: int  # 1-based line of the manifest
    messages: list
    tokens: int = 0  # prompt length, audio included
    seconds: float = 0.0  # audio, summed over its clips
    targets: list = field(default_factory=list)


# ---- the manifest -------------------------------------------------------------------------------


def read_manifest(path: str | os.PathLike, processor: Any) -> list[Example]:
    """Read and check every line of a JSONL manifest; ManifestError lists every bad line at once.

    A line is {"messages": [...]} or a bare list of messages, with at least one assistant turn.
    A clip over 10 minutes (AF3 would hear only its start) or a prompt longer than the text
    model's context is refused here, with its line number, never halfway through training.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"manifest not found: {path}")
    check_utf8(path)
    examples, errors = [], []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                examples.append(_check_example(number, line, path.parent, processor))
            except (ValueError, TypeError, OSError) as e:
                errors.append(f"{path}:{number}: {e}")
    if errors:
        raise ManifestError(f"{len(errors)} of the manifest's examples cannot be used (fix or remove them):\n"
                            + "\n".join(errors))
    if not examples:
        raise ManifestError(f"{path} holds no examples")
    return examples


def _check_example(number: int, line: str, root: Path, processor: Any) -> Example:
    record = parse_json(line, "")  # the caller names the file and line
    if isinstance(record, dict) and "messages" not in record:
        raise ValueError(f'a JSON object needs "messages" (a list of messages), got keys {sorted(record)[:5]}')
    messages = record.get("messages") if isinstance(record, dict) else record
    check_conversation(messages)
    if not any(m["role"] == "assistant" for m in messages):
        raise ValueError("no assistant turn: nothing to learn from this conversation")
    messages = [_resolve_paths(m, root) for m in messages]
    example = Example(number, messages)
    for item in _audio_items(messages):
        source = next(item[k] for k in AUDIO_KEYS if k in item)
        samples = load_audio(source, max_seconds=None).shape[0]
        seconds = samples / SAMPLING_RATE
        if seconds > MAX_SECONDS:
            raise ValueError(f"clip {source!r} is {seconds:.1f} s long; AF3 hears at most {MAX_SECONDS:g} s "
                             "(10 minutes): cut it into shorter clips")
        example.seconds += seconds
    batch = processor.apply_chat_template(messages, add_generation_prompt=False, output_labels="assistant",
                                          padding_side="right")
    example.tokens = batch["input_ids"].shape[1]
    if not target_count(batch["labels"], batch["attention_mask"]):
        raise ValueError("the assistant turns hold no token to learn")
    return example


def _resolve_paths(message: dict, root: Path) -> dict:
    if isinstance(message["content"], str):
        return message
    content = []
    for item in message["content"]:
        source = item.get("path")
        if item["type"] == "audio" and isinstance(source, str) and not _URL.match(source):
            item = {**item, "path": str(root / source)}  # relative to the manifest's folder
        content.append(item)
    return {**message, "content": content}


def _audio_items(messages: list) -> Iterator[dict]:
    for m in messages:
        if not isinstance(m["content"], str):
            yield from (item for item in m["content"] if item["type"] == "audio")


def make_batch(examples: list[Example], processor: Any) -> Any:
    """Right-padded inputs with labels on the assistant turns (padding and prompts are -100)."""
    return processor.apply_chat_template([e.messages for e in examples], add_generation_prompt=False,
                                         output_labels="assistant", padding_side="right")


def target_count(labels: torch.Tensor, attention_mask: torch.Tensor) -> int:
    """Tokens the model's next-token loss averages over: labels[:, i + 1] that are not IGNORE_INDEX,
    predicted from a real (unpadded) position i (af3.model's loss skips the others)."""
    return int(((labels[:, 1:] != IGNORE_INDEX) & (attention_mask[:, :-1] != 0)).sum())


# ---- model set-up -------------------------------------------------------------------------------


def prepare_model(model: nn.Module, config: TrainConfig, gradient_checkpointing: bool = False) -> list[str]:
    """Add LoRA and/or unfreeze whole parts as `config.train` says; returns the trained parameters' names."""
    if "lora" in config.train:
        lora.add_lora(model, config.lora_rank, config.lora_alpha, config.lora_dropout, config.targets())
    else:
        for p in model.parameters():
            p.requires_grad_(False)
    for part in config.train:
        if part in PARTS:
            module = getattr(model, part)
            module.float()  # AdamW on bf16 weights loses small updates: train parts in fp32
            for name, p in module.named_parameters():
                if not name.endswith("embed_positions.weight"):  # the encoder's fixed sinusoid table
                    p.requires_grad_(True)
    model.encoder.gradient_checkpointing = model.decoder.gradient_checkpointing = gradient_checkpointing
    return [n for n, p in model.named_parameters() if p.requires_grad]


def learning_rate(step: int, config: TrainConfig) -> float:
    """Linear warm-up from 0 over warmup_steps, then cosine decay to 0 at `steps` (step counts from 0)."""
    if step < config.warmup_steps:
        return config.lr * (step + 1) / config.warmup_steps
    progress = (step - config.warmup_steps) / max(1, config.steps - config.warmup_steps)
    return config.lr * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def sample_order(n: int, seed: int, start: int, count: int) -> list[int]:
    """Indices start .. start + count - 1 of an endless stream of shuffled epochs (epoch e: seed + e)."""
    out: list[int] = []
    epoch = None
    perm: list[int] = []
    for k in range(start, start + count):
        if k // n != epoch:
            epoch = k // n
            perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed + epoch)).tolist()
        out.append(perm[k % n])
    return out


# ---- checkpoints --------------------------------------------------------------------------------


def save_checkpoint(directory: Path, model: nn.Module, optimizer: torch.optim.Optimizer, config: TrainConfig,
                    step: int, trained: list[str]) -> Path:
    """Adapter / trained parts, optimizer state and step, written all at once (temp folder + rename)."""
    files: dict[str, dict] = {}
    if "lora" in config.train:
        files[lora.CONFIG_FILE], files[lora.WEIGHTS_FILE] = lora.adapter_files(model)
    params = dict(model.named_parameters())
    parts = {n: params[n].detach().cpu().contiguous() for n in trained if ".lora_" not in n}
    if parts:
        files[PARTS_FILE] = parts
    state = {}
    for name in trained:
        s = optimizer.state.get(params[name], {})
        for key, value in s.items():
            state[f"{name}.{key}"] = torch.as_tensor(value).detach().cpu().contiguous()
    files[OPTIMIZER_FILE] = state
    files[STATE_FILE] = {"step": step, "config": asdict(config)}
    return lora.write_folder(directory, True, files, what="training checkpoint", marker=STATE_FILE)


def load_parts(model: nn.Module, directory: str | os.PathLike) -> list[str]:
    """Copy the fully fine-tuned tensors of a checkpoint folder (`--train projector`, ...) into `model`."""
    where = Path(directory) / PARTS_FILE
    if not where.is_file():
        raise FileNotFoundError(f"{where} not found: {directory} holds no fully fine-tuned parts")
    # By parameter name (what save_checkpoint writes), or by state-dict name, where q, k and v
    # are apart (the state dict's tensors are views of the parameters).
    params = {**model.state_dict(), **dict(model.named_parameters())}
    got = _read(where)
    unknown = sorted(set(got) - set(params))
    if unknown:
        raise ValueError(f"{where}: tensors {unknown[:3]} are not parameters of this model")
    with torch.no_grad():
        for name, value in got.items():
            if value.shape != params[name].shape:
                raise ValueError(f"{where}: {name} has shape {list(value.shape)}, the model's is "
                                 f"{list(params[name].shape)}")
            params[name].copy_(value)
    return sorted(got)


def latest_checkpoint(output: Path) -> Path | None:
    """The checkpoint folder in `output` (checkpoint-NNNNNN/ or final/) with the most steps, or None."""
    found = [(parse_json(state.read_bytes(), str(state))["step"], state.parent)
             for pattern in ("checkpoint-*/" + STATE_FILE, "final/" + STATE_FILE) for state in output.glob(pattern)]
    return max(found, key=lambda f: f[0])[1] if found else None


def load_checkpoint(directory: Path, model: nn.Module, optimizer: torch.optim.Optimizer, config: TrainConfig,
                    trained: list[str]) -> int:
    """Restore what save_checkpoint wrote; returns the step to continue from."""
    state = parse_json((directory / STATE_FILE).read_bytes(), str(directory / STATE_FILE))
    saved = TrainConfig(**state["config"])
    if saved != config:
        diff = {k: (v, getattr(config, k)) for k, v in asdict(saved).items() if getattr(config, k) != v}
        raise ValueError(f"{directory} was made with other settings {diff} (saved, now); resume with the "
                         "same settings, or train into a new --output")
    params = dict(model.named_parameters())
    with torch.no_grad():
        if "lora" in config.train:
            expected = lora.adapter_tensors(model)
            got = _read(directory / lora.WEIGHTS_FILE)
            _check_keys(directory / lora.WEIGHTS_FILE, set(got), set(expected))
            for k, v in got.items():
                expected[k].copy_(v)
        parts = [n for n in trained if ".lora_" not in n]
        if parts:
            got = _read(directory / PARTS_FILE)
            _check_keys(directory / PARTS_FILE, set(got), set(parts))
            for k, v in got.items():
                params[k].copy_(v)
    flat = _read(directory / OPTIMIZER_FILE)
    by_param = {}
    for i, name in enumerate(trained):
        entries = {key[len(name) + 1:]: v for key, v in flat.items() if key.rpartition(".")[0] == name}
        if entries:
            by_param[i] = entries
    optimizer.load_state_dict({"state": by_param, "param_groups": optimizer.state_dict()["param_groups"]})
    return int(state["step"])


def _read(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file a run wrote; a missing or damaged one is named."""
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found")
    try:
        return load_file(str(path))
    except SafetensorError as e:  # cut short, or not safetensors at all
        raise ValueError(f"{path}: not a readable safetensors file ({e})") from None


def _check_keys(where: Path, got: set, expected: set) -> None:
    if got != expected:
        raise ValueError(f"{where} does not fit this model: missing {sorted(expected - got)[:3]}, "
                         f"unexpected {sorted(got - expected)[:3]}")


# ---- the loop -----------------------------------------------------------------------------------


@dataclass
class Run:
    """Where a run reads and writes, and how it reports (nothing here changes the result)."""

    output: Path
    save_every: int = 0  # 0: only the final checkpoint
    eval_every: int = 0  # 0: evaluate at the end only (when there is an eval set)
    log_every: int = 1
    resume: bool = False
    log: Any = print


def train(model: nn.Module, processor: Any, train_set: list[Example], config: TrainConfig, run: Run,
          eval_set: list[Example] | None = None, gradient_checkpointing: bool = False,
          autocast_dtype: torch.dtype | None = None) -> dict:
    """Fine-tune `model` in place; returns {"step", "loss" (last), "eval_loss"}.

    Under torchrun (torch.distributed initialised) each process takes its share of every global
    batch and DistributedDataParallel averages the gradients.
    """
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    device = next(model.parameters()).device
    trained = prepare_model(model, config, gradient_checkpointing)
    params = dict(model.named_parameters())
    # Matrices decay, biases and norms do not; the optimizer numbers parameters in this order.
    trained = [n for n in trained if params[n].dim() >= 2] + [n for n in trained if params[n].dim() < 2]
    n_decay = sum(1 for n in trained if params[n].dim() >= 2)
    optimizer = torch.optim.AdamW([
        {"params": [params[n] for n in trained[:n_decay]], "weight_decay": config.weight_decay},
        {"params": [params[n] for n in trained[n_decay:]], "weight_decay": 0.0}], lr=config.lr)
    start = 0
    if run.resume and (found := latest_checkpoint(run.output)) is not None:
        start = load_checkpoint(found, model, optimizer, config, trained)
        run.log(f"resumed from {found} at step {start}")
    elif run.resume:  # said, so that a mistyped --output does not pass for a resumed run
        run.log(f"nothing to resume in {run.output}: starting at step 0")
    elif latest_checkpoint(run.output) is not None:
        raise FileExistsError(f"{run.output} already holds checkpoints; pass --resume to continue, or choose "
                              "another --output")
    ddp = nn.parallel.DistributedDataParallel(model, device_ids=[device] if device.type == "cuda"
                                              else None) if world > 1 else model
    autocast = (torch.autocast(device.type, dtype=autocast_dtype) if autocast_dtype is not None
                else nullcontext())
    per_step = config.batch_size * config.grad_accum * world
    t0, tokens_seen, loss_value, eval_loss = time.perf_counter(), 0, float("nan"), None
    model.train()
    for step in range(start, config.steps):
        lr = learning_rate(step, config)
        for group in optimizer.param_groups:
            group["lr"] = lr
        torch.manual_seed(config.seed * 1_000_003 + step * world + rank)  # dropout: the same on resume
        order = sample_order(len(train_set), config.seed, step * per_step, per_step)
        micro = [order[(i * world + rank) * config.batch_size:(i * world + rank + 1) * config.batch_size]
                 for i in range(config.grad_accum)]
        batches = [make_batch([train_set[j] for j in idx], processor).to(device) for idx in micro]
        counts = torch.tensor([target_count(b["labels"], b["attention_mask"]) for b in batches] +
                              [int(b["attention_mask"].sum()) for b in batches], dtype=torch.float64,
                              device=device)
        totals = counts.clone()
        if world > 1:
            dist.all_reduce(totals)
        n_targets = float(totals[:config.grad_accum].sum())
        loss_sum = torch.zeros((), dtype=torch.float64, device=device)
        for i, batch in enumerate(batches):
            last = i == len(batches) - 1
            with (nullcontext() if last or world == 1 else ddp.no_sync()), autocast:
                loss = ddp(**batch).loss  # mean over this micro-batch's targets
            # As a share of the global batch's token sum; DDP divides by world, so multiply back.
            (loss * (float(counts[i]) * world / n_targets)).backward()
            loss_sum += loss.detach().double() * float(counts[i])
        if config.max_grad_norm:
            torch.nn.utils.clip_grad_norm_([params[n] for n in trained], config.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if world > 1:
            dist.all_reduce(loss_sum)
        loss_value = float(loss_sum) / n_targets
        tokens_seen += int(totals[config.grad_accum:].sum())
        done = step + 1
        if not math.isfinite(loss_value):  # the weights just stepped on it: stop, save nothing
            raise DivergedError(f"step {done}: the loss is {loss_value}, so training diverged; nothing more was "
                                "saved (checkpoints written before are kept): lower the learning rate, or "
                                "look for a bad example")
        if done % run.log_every == 0 or done == config.steps:
            elapsed = time.perf_counter() - t0
            eta = elapsed / (done - start) * (config.steps - done)
            if rank == 0:
                run.log(f"step {done}/{config.steps}  loss {loss_value:.4f}  lr {lr:.2e}  "
                        f"{tokens_seen / elapsed:.0f} tok/s  eta {_clock(eta)}")
        if eval_set and (done == config.steps or run.eval_every and done % run.eval_every == 0):
            eval_loss = evaluate(model, processor, eval_set, config.batch_size, autocast_dtype)
            if rank == 0:
                run.log(f"step {done}/{config.steps}  eval loss {eval_loss:.4f}")
        if rank == 0 and run.save_every and done % run.save_every == 0 and done != config.steps:
            save_checkpoint(run.output / f"checkpoint-{done:06d}", model, optimizer, config, done, trained)
    if rank == 0:
        final = save_checkpoint(run.output / "final", model, optimizer, config, config.steps, trained)
        run.log(f"saved {final}")
    if world > 1:
        dist.barrier()
    return {"step": config.steps, "loss": loss_value, "eval_loss": eval_loss}


@torch.no_grad()
def evaluate(model: nn.Module, processor: Any, examples: list[Example], batch_size: int,
             autocast_dtype: torch.dtype | None = None) -> float:
    """Mean next-token loss over the assistant tokens of `examples` (shared among processes)."""
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    sums = torch.zeros(2, dtype=torch.float64, device=device)  # loss sum, target count
    mine = examples[rank::world]
    for i in range(0, len(mine), batch_size):
        batch = make_batch(mine[i:i + batch_size], processor).to(device)
        with (torch.autocast(device.type, dtype=autocast_dtype) if autocast_dtype else nullcontext()):
            loss = model(**batch).loss
        n = target_count(batch["labels"], batch["attention_mask"])
        sums += torch.tensor([float(loss) * n, n], dtype=torch.float64, device=device)
    if world > 1:
        dist.all_reduce(sums)
    model.train(was_training)
    return float(sums[0] / sums[1])


def _clock(seconds: float) -> str:
    seconds = round(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


# ---- memory -------------------------------------------------------------------------------------


def memory_estimate(model: nn.Module, rank: int = 8, targets: tuple[str, ...] = lora.DECODER_TARGETS,
                    audio_seconds: float = 30.0, text_tokens: int = 100, checkpointing: bool = False,
                    weight_bytes: int = 2, activation_bytes: int = 2) -> dict[str, int]:
    """Bytes a LoRA fine-tuning step needs, from the model's dimensions (a meta-device model will do).

    weights (frozen, `weight_bytes` each), LoRA factors + their gradients + AdamW's two moments
    (fp32), and the decoder activations kept for the backward pass of one conversation with
    `audio_seconds` of audio and `text_tokens` of text. The encoder keeps none when nothing in
    it trains. Per decoder layer and token, without checkpointing: the residual stream and norm
    outputs (4 d), q, k, v, rotated q, k and the attention output (3 d + 4 kv), the MLP's gate,
    up, silu(gate) and product (4 ffn), the inputs of every LoRA factor pair (r each) and the two
    fp32 RMSNorm inputs (2 x 2 d in 2-byte units), and the (T, T) mask SDPA keeps. With checkpointing: one layer input per layer,
    plus one layer's worth during its recomputation. Logits: (T, vocab) in the activation dtype,
    plus fp32 copies for the loss and its gradient. An estimate, not a measurement.
    """
    text = model.config.text
    tokens = round(audio_seconds * 25) + text_tokens  # 25 audio tokens per second
    n_weights = sum(p.numel() for p in model.parameters())
    probe = _LoraCount(model, rank, targets)
    d, kv, ffn = text.hidden_size, text.num_key_value_heads * text.head_dim, text.intermediate_size
    per_layer = 4 * d + 3 * d + 4 * kv + 4 * ffn + probe.per_layer_rank + 4 * d
    layers = text.num_hidden_layers
    kept = tokens * (d * layers + per_layer) if checkpointing else tokens * per_layer * layers
    kept += (1 if checkpointing else layers) * tokens * tokens  # SDPA keeps its (T, T) additive mask
    logits = tokens * text.vocab_size * (activation_bytes + 4 + 4)
    out = {"weights": n_weights * weight_bytes, "lora": probe.params * 4 * 4,
           "activations": kept * activation_bytes + logits}
    out["total"] = sum(out.values())
    return out


class _LoraCount:
    """LoRA parameter count and per-layer factor inputs of `targets` on `model`, without changing it."""

    def __init__(self, model: nn.Module, rank: int, targets: tuple[str, ...]):
        import fnmatch

        self.params = self.per_layer_rank = 0
        for name, (module, _, (start, stop)) in lora.adaptable(model).items():
            m = model.get_submodule(module)
            if isinstance(m, nn.Linear) and any(fnmatch.fnmatchcase(name, t) for t in targets):
                self.params += rank * (m.in_features + stop - start)
                if name.startswith("decoder.layers.0."):
                    self.per_layer_rank += rank


def gib(n: int) -> str:
    return f"{n / 2**30:.1f} GiB"

