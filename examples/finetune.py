"""Fine-tune AF3 on a JSONL manifest of conversations: LoRA adapters (default) or whole parts.

    python examples/finetune.py train.jsonl --checkpoint af3-checkpoint --output runs/mine
    torchrun --nproc-per-node 2 examples/finetune.py train.jsonl --checkpoint af3-checkpoint --output runs/mine

One line per conversation: {"messages": [{"role": "user", "content": [{"type": "audio", "path":
"clip.wav"}, {"type": "text", "text": "What is it?"}]}, {"role": "assistant", "content": "A dog."}]}
(audio paths relative to the manifest). The assistant turns are learned. Every line is checked
before training starts. The adapter lands in OUTPUT/final (PEFT format): apply it with
af3.lora.load_adapter(m.model, "OUTPUT/final"), or merge it with
`python -m weights_convert SRC DST --adapter OUTPUT/final`.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from pathlib import Path

# Run from a clone without installing: make the repository importable.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from examples._common import FLAGS, as_flags, default_device, finite, seed

DTYPES = ("float32", "bfloat16")  # fp16 training would need loss scaling; bf16 does not


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("manifest", help="training conversations, one JSON object per line")
    p.add_argument("--checkpoint", required=True, help="af3 checkpoint directory (made by weights_convert)")
    p.add_argument("--output", required=True, help="folder for checkpoint-NNNNNN/ and final/")
    p.add_argument("--eval-manifest", default=None, help="held-out conversations for the eval loss")
    p.add_argument("--train", default="lora",
                   help="comma-separated: 'lora' and/or parts trained in full: encoder, projector, decoder")
    p.add_argument("--lora-rank", type=int, default=8)
    p.add_argument("--lora-alpha", type=finite, default=16.0)
    p.add_argument("--lora-dropout", type=finite, default=0.05)
    p.add_argument("--lora-targets", default="decoder",
                   help="comma-separated groups (decoder, encoder-attention, projector) or module patterns "
                        "such as 'decoder.layers.*.attn.q'")
    p.add_argument("--batch-size", type=int, default=1, help="conversations per micro-batch per process")
    p.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step")
    p.add_argument("--steps", type=int, default=None, help="optimizer steps (default: from --epochs)")
    p.add_argument("--epochs", type=finite, default=1.0, help="passes over the manifest, when --steps is not given")
    p.add_argument("--lr", type=finite, default=1e-4, help="peak AdamW learning rate")
    p.add_argument("--warmup-steps", type=int, default=0, help="linear warm-up, then cosine decay to 0")
    p.add_argument("--weight-decay", type=finite, default=0.0)
    p.add_argument("--max-grad-norm", type=finite, default=1.0, help="gradient clipping (0: none)")
    p.add_argument("--gradient-checkpointing", action="store_true",
                   help="recompute encoder/decoder layer activations in the backward pass (less memory)")
    p.add_argument("--save-every", type=int, default=0, help="checkpoint every N steps (0: only the final one)")
    p.add_argument("--eval-every", type=int, default=0, help="eval loss every N steps (0: at the end)")
    p.add_argument("--log-every", type=int, default=1, help="progress line every N steps")
    p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in --output")
    p.add_argument("--seed", type=seed, default=0)
    p.add_argument("--device", default=None, help="cuda, cpu, ... (default: cuda if available; torchrun: cuda:LOCAL_RANK)")
    p.add_argument("--dtype", choices=DTYPES, default=None,
                   help="frozen weights' dtype; bfloat16 also runs the forward pass under bf16 autocast "
                        "(default: bfloat16 on a GPU, float32 on the CPU)")
    args = p.parse_args(argv)
    for name in ("lora_rank", "batch_size", "grad_accum", "log_every"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    for name in ("save_every", "eval_every", "warmup_steps"):
        if getattr(args, name) < 0:
            p.error(f"--{name.replace('_', '-')} must be >= 0, got {getattr(args, name)}")
    if args.steps is not None and args.steps < 1:
        p.error(f"--steps must be >= 1, got {args.steps}")
    if not args.epochs > 0:
        p.error(f"--epochs must be > 0, got {args.epochs}")
    if not args.lr > 0:
        p.error(f"--lr must be > 0, got {args.lr}")
    if not 0 <= args.lora_dropout < 1:
        p.error(f"--lora-dropout must be in [0, 1), got {args.lora_dropout}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import torch
    import torch.distributed as dist

    import af3
    from af3 import finetune
    from af3.corpus import init_distributed

    world = int(os.environ.get("WORLD_SIZE", "1"))
    try:  # under torchrun: join the group (nccl on this rank's GPU, gloo on the CPU)
        rank_device = init_distributed(args.device, timeout=None) if not dist.is_initialized() else None
    except (ValueError, RuntimeError) as e:
        print(f"error: cannot start under torchrun: {e}", file=sys.stderr)
        return 2
    rank = dist.get_rank() if dist.is_initialized() else 0
    say = print if rank == 0 else (lambda *a, **k: None)
    try:
        return run(args, torch, af3, finetune, world, say, rank_device)
    except KeyboardInterrupt:
        say("\ninterrupted (continue with --resume)", file=sys.stderr)
        return 130
    finally:
        if world > 1 and dist.is_initialized():
            dist.destroy_process_group()


def run(args: argparse.Namespace, torch, af3, finetune, world: int, say, rank_device) -> int:
    if rank_device is not None:
        device = str(rank_device)
    elif args.device is not None:
        device = args.device
    else:
        device = "cuda:0" if default_device() == "cuda" else "cpu"
    on_gpu = device.startswith("cuda")
    if on_gpu:
        if not torch.cuda.is_available():
            say(f"error: --device {device}: CUDA is not available here (use --device cpu)", file=sys.stderr)
            return 2
        try:
            cuda = torch.device(device)
            if cuda.index is None:  # "cuda": the current GPU, named so that set_device takes it
                cuda = torch.device("cuda", torch.cuda.current_device())
            torch.cuda.set_device(cuda)
        except (RuntimeError, ValueError) as e:
            say(f"error: --device {device}: {e}", file=sys.stderr)
            return 2
        device = str(cuda)
    dtype = args.dtype or ("bfloat16" if on_gpu else "float32")
    try:
        config = finetune.TrainConfig(
            train=tuple(args.train.split(",")), lora_rank=args.lora_rank, lora_alpha=args.lora_alpha,
            lora_dropout=args.lora_dropout, lora_targets=tuple(args.lora_targets.split(",")),
            batch_size=args.batch_size, grad_accum=args.grad_accum, steps=args.steps or 1, lr=args.lr,
            warmup_steps=args.warmup_steps, weight_decay=args.weight_decay, max_grad_norm=args.max_grad_norm,
            seed=args.seed)
    except ValueError as e:  # in the flags' names: "lora_alpha must be ..." -> "--lora-alpha must be ..."
        say(f"error: {as_flags(str(e), tuple(FLAGS.values()))}", file=sys.stderr)
        return 2
    problem = output_problem(Path(args.output))
    if problem:
        say(f"error: --output {args.output}: {problem}", file=sys.stderr)
        return 2
    try:
        m = af3.load(args.checkpoint, device=device, dtype=getattr(torch, dtype))
    except (OSError, ValueError, TypeError, RuntimeError) as e:
        say(f"error: cannot load checkpoint {args.checkpoint}: {e}", file=sys.stderr)
        return 2
    try:
        train_set = finetune.read_manifest(args.manifest, m.processor)
        eval_set = finetune.read_manifest(args.eval_manifest, m.processor) if args.eval_manifest else None
    except (OSError, ValueError) as e:  # every bad line, with its number, before any training
        say(f"error: {e}", file=sys.stderr)
        return 1
    if args.steps is None:
        per_step = args.batch_size * args.grad_accum * world
        config.steps = max(1, math.ceil(args.epochs * len(train_set) / per_step))
    audio = sum(e.seconds for e in train_set)
    say(f"{len(train_set)} conversations ({audio / 60:.1f} min of audio, longest prompt "
        f"{max(e.tokens for e in train_set)} tokens); {config.steps} steps of "
        f"{config.batch_size * config.grad_accum * world} on {world} process(es), {device}, {dtype}")
    torch.manual_seed(config.seed)  # the adapters' initial A
    run_settings = finetune.Run(output=Path(args.output), save_every=args.save_every, eval_every=args.eval_every,
                                log_every=args.log_every, resume=args.resume, log=lambda s: say(s, flush=True))
    try:
        finetune.train(m.model, m.processor, train_set, config, run_settings, eval_set=eval_set,
                       gradient_checkpointing=args.gradient_checkpointing,
                       autocast_dtype=torch.bfloat16 if dtype == "bfloat16" else None)
    except (OSError, ValueError, TypeError) as e:  # OSError: a checkpoint that cannot be written or read
        say(f"error: {e}", file=sys.stderr)
        return 2
    return 0


def output_problem(output: Path) -> str | None:
    """Why checkpoints could not be written under `output`, checked before any training; or None."""
    if output.exists() and not output.is_dir():
        return "exists and is not a folder"
    folder = output
    while not folder.exists():  # the nearest folder that exists: the run creates the rest
        folder = folder.parent
    if not folder.is_dir():
        return f"{folder} is not a folder"
    if not os.access(folder, os.W_OK | os.X_OK):
        return f"cannot write in {folder}"
    return None


if __name__ == "__main__":
    sys.exit(main())
