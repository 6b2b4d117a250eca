"""`make demo`: af3 end to end on a tiny random checkpoint, on any machine, in about a minute.

1. builds (once, cached in .demo/) a tiny random AF3 in the Hugging Face layout, saved by
   transformers' own `save_pretrained` (model, processor with a small byte-level BPE tokenizer,
   generation config), as a fine-tuned AF3 comes out of transformers;
2. converts it with `python -m weights_convert` (the same command as for the real model) into
   .demo/af3-checkpoint;
3. synthesises a few seconds of audio (a sine sweep with noise) as .demo/speech.wav;
4. runs examples/transcribe.py on it.

The README's Python blocks name `af3-checkpoint` and `speech.wav`: run them from .demo/.
The weights are random, so the "transcription" is gibberish: the demo shows that every stage
runs, not what AF3 can do. The end of the output says how to run the real model.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # tests/tiny_checkpoint.py builds the tiny HF checkpoint

DEMO = ROOT / ".demo"
HF_NAME, AF3_NAME, WAV_NAME = "hf-checkpoint", "af3-checkpoint", "speech.wav"
DONE_NAME = "built"  # written last: a half-built folder is rebuilt, never used
# The tiny model's context and reply length: room for every README block, quick on a CPU.
CONTEXT, MAX_NEW_TOKENS = 2048, 16

REAL_MODEL = """\
These weights are RANDOM: the text above is meaningless by design. To run the real model:

  # 1. download nvidia/audio-flamingo-3-hf (about 16.5 GB), e.g. with huggingface_hub's CLI
  hf download nvidia/audio-flamingo-3-hf --local-dir audio-flamingo-3-hf
  # 2. convert it once into af3's layout
  .venv/bin/python -m weights_convert audio-flamingo-3-hf af3-checkpoint
  # 3. transcribe (a GPU with about 18 GB is picked automatically; the CPU works, slowly)
  .venv/bin/python examples/transcribe.py your.wav --checkpoint af3-checkpoint
"""


def build(folder: Path = DEMO) -> Path:
    """Build the demo's files in `folder`: hf-checkpoint/, af3-checkpoint/, speech.wav; returns it."""
    from tests.tiny_checkpoint import write_tiny_hf_checkpoint

    folder = Path(folder)
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    hf = folder / HF_NAME
    print(f"[demo] saving a tiny random AF3 with transformers' save_pretrained to {_rel(hf)}", flush=True)
    write_tiny_hf_checkpoint(hf, style="new", max_position_embeddings=CONTEXT,
                             generation={"max_new_tokens": MAX_NEW_TOKENS})
    print(f"[demo] converting it: python -m weights_convert {_rel(hf)} {_rel(folder / AF3_NAME)}", flush=True)
    subprocess.run([sys.executable, "-m", "weights_convert", str(hf), str(folder / AF3_NAME), "--quiet"],
                   cwd=ROOT, check=True)
    write_audio(folder / WAV_NAME)
    (folder / DONE_NAME).write_text("ok\n")
    return folder


def write_audio(path: Path, seconds: float = 3.0, rate: int = 16000) -> None:
    import numpy as np
    import soundfile

    t = np.arange(int(seconds * rate)) / rate
    sweep = 0.3 * np.sin(2 * np.pi * (200 + 300 * t) * t)  # 200 Hz rising to about 2 kHz
    noise = 0.02 * np.random.default_rng(0).standard_normal(t.size)
    soundfile.write(str(path), (sweep + noise).astype(np.float32), rate)
    print(f"[demo] synthesised {seconds:.0f} s of audio: {_rel(path)}", flush=True)


def _rel(path: Path) -> str:
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)


def main(folder: Path = DEMO) -> int:
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        print(f"[demo] error: {_rel(folder)} exists and is not a folder; the demo keeps its files there: "
              "move it away", file=sys.stderr)
        return 1
    if (folder / DONE_NAME).exists():
        print(f"[demo] using the cached tiny checkpoint in {_rel(folder)}/ (delete it to rebuild)")
    else:
        build(folder)
    ckpt, wav = folder / AF3_NAME, folder / WAV_NAME
    print(f"[demo] python examples/transcribe.py {_rel(wav)} --checkpoint {_rel(ckpt)}", flush=True)
    result = subprocess.run([sys.executable, str(ROOT / "examples" / "transcribe.py"), str(wav),
                             "--checkpoint", str(ckpt), "--max-new-tokens", "24", "--seed", "0"],
                            check=False, cwd=ROOT)
    print()
    print(f"[demo] left: the checkpoint {_rel(ckpt)}/ and the clip {_rel(wav)}; the README's Python blocks "
          f"run as they are from {_rel(folder)}/ (cd {_rel(folder)} && ../.venv/bin/python)")
    print()
    print(REAL_MODEL)
    return result.returncode


if __name__ == "__main__":
    import argparse

    argparse.ArgumentParser(description=__doc__.split("\n\n")[0]).parse_args()  # --help, without torch
    sys.exit(main())
