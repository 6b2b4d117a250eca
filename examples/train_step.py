"""One supervised fine-tuning step: labels from the processor, loss, backward, optimizer step.

    python examples/train_step.py speech.wav "The reference transcription." --checkpoint af3-checkpoint

The conversation is a user turn (audio + instruction) and the assistant turn to learn. With
`output_labels="assistant"` only the assistant's tokens (and the <|im_end|> closing its turn)
are scored; `output_labels=True` scores every non-audio, non-pad token, as transformers does.
The step is printed as the loss before and after; the checkpoint on disk is not changed.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

# Run from a clone without installing: make the repository importable. torch loads after --help.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from examples._common import (
    DEVICE_HELP,
    device_and_dtype,
    finite,
    print_error,
)

FLAGS = ("--dtype", "--device")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("audio", help="audio file")
    p.add_argument("target", help="the assistant's reply to learn")
    p.add_argument("--checkpoint", required=True, help="af3 checkpoint directory")
    p.add_argument("--prompt", default="Transcribe the input speech.", help="the user's instruction")
    p.add_argument("--lr", type=finite, default=1e-5, help="AdamW learning rate (default 1e-5)")
    p.add_argument("--device", default=None, help=DEVICE_HELP)
    p.add_argument("--dtype", choices=("bfloat16", "float32"), default="float32",
                   help="weights dtype (default float32: a plain, exact step; bfloat16 halves the memory; "
                        "float16 would need loss scaling, so it is not offered)")
    args = p.parse_args(argv)
    if not args.lr > 0:
        p.error(f"--lr must be > 0, got {args.lr}")

    import torch

    import af3

    device, dtype = device_and_dtype(args.device, args.dtype)
    try:
        m = af3.load(args.checkpoint, device=device, dtype=dtype)
    except (OSError, ValueError, TypeError, RuntimeError) as e:
        print_error(f"cannot load checkpoint {args.checkpoint}: {e}", FLAGS)
        return 2
    conversation = [
        {"role": "user", "content": [{"type": "audio", "path": args.audio},
                                     {"type": "text", "text": args.prompt}]},
        {"role": "assistant", "content": args.target},
    ]
    try:
        batch = m.processor.apply_chat_template(conversation, add_generation_prompt=False,
                                                output_labels="assistant").to(device)
    except (OSError, ValueError, TypeError) as e:  # an unreadable audio file, a prompt too long
        text = str(e)  # "clip 0 of sample 0: ..." is about the one audio file: name it
        print_error(f"{args.audio}: {text}" if text.startswith("clip ") else text, FLAGS)
        return 1

    model = m.model
    try:
        model.train()
    except ValueError as e:  # a quantized checkpoint: its int8/int4 weights cannot be trained
        print_error(f"{args.checkpoint}: {e}")
        return 2
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr)
    loss = model(**batch).loss  # batch holds input_ids, attention_mask, input_features(_mask), labels
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)

    model.eval()
    with torch.no_grad():
        after = model(**batch).loss
    print(f"loss before {loss.item():.4f}  after one step {after.item():.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
