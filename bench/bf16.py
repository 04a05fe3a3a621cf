"""Check: the cache path against the full model in bfloat16 on the device a run trains on.

The test suite holds the cache path's loss and logits `torch.equal` to transformers' full model on the
raw video in float32 on CPU (tests/test_train_parity.py). Training on a GPU runs in bfloat16, with other
kernels: this check builds both paths the way that test does (the checkpoint's own `AutoProcessor` on
plainly decoded frames and audio, the full `...ForConditionalGeneration` / Omni thinker; qprep's towers
and language model on the cached tokens), with every weight in bfloat16 on --device, for each family's
tiny random checkpoint in the released layout, and reports per family:

* whether the towers' tokens equal the full model's own visual embeddings in the prompt (bitwise);
* the largest |logit difference| and the loss difference between the two paths, and whether they
  are bitwise equal. The goal: |loss difference| <= 1e-2 · |loss| (bfloat16's 8-bit mantissa over
  a few layers); bitwise where the two paths run the same kernels.

Reproduce (from the repository root, with the virtualenv active):

    python bench/bf16.py                      # cuda when available, else CPU (minutes on 2 cores)
    python bench/bf16.py --families qwen2_5_vl qwen3_vl --device cpu
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

FAMILIES = ("qwen2_vl", "qwen2_5_vl", "qwen2_5_omni", "qwen3_vl", "qwen3_vl_moe", "qwen3_5", "qwen3_omni_moe")
RELATIVE_LOSS_GOAL = 1e-2


def check(kind: str, workdir: Path, device: str) -> dict:
    from qprep.models.tiny import make_tiny_model
    from qprep.synth import VideoSpec, make_video
    from test_train_parity import CLIP, _both_paths

    def tiny_model(name, layout):
        return make_tiny_model(name, workdir / f"{name}-{layout}", layout=layout)

    def videos(name, **spec):
        path = workdir / name
        return path if path.exists() else make_video(path, VideoSpec(**spec))

    began = time.perf_counter()
    full, inputs, model_kwargs, labels, language_model, batch = _both_paths(tiny_model, videos, kind, "released",
                                                                            dtype="bfloat16", device=device)
    with torch.no_grad():
        expected = full(**inputs, labels=labels, **model_kwargs)
        loss, logits = language_model(batch)
    gap = float((logits.float() - expected.logits.float()).abs().max())
    loss_gap = abs(float(loss) - float(expected.loss))
    return {"family": kind, "loss": float(expected.loss), "loss_gap": loss_gap, "logit_gap": gap,
            "bitwise": bool(torch.equal(logits, expected.logits) and torch.equal(loss, expected.loss)),
            "met": loss_gap <= RELATIVE_LOSS_GOAL * abs(float(expected.loss)), "seconds": time.perf_counter() - began}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--families", nargs="+", default=list(FAMILIES), choices=FAMILIES)
    parser.add_argument("--device", choices=("cuda", "cpu"), help="default: cuda when available")
    args = parser.parse_args(argv)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    rows = []
    with tempfile.TemporaryDirectory(prefix="qprep-bf16-") as workdir:
        for kind in args.families:
            rows.append(check(kind, Path(workdir), device))
            print(f"  {kind}: {rows[-1]['seconds']:.1f} s", file=sys.stderr, flush=True)
    name = torch.cuda.get_device_name() if device == "cuda" else "CPU"
    print(f"bfloat16 on {device} ({name}), tiny random checkpoints in the released layout, one clip; "
          f"goal |loss difference| <= {RELATIVE_LOSS_GOAL:g} x |loss|\n")
    print("| family | loss (full model) | |loss difference| | max |logit difference| | bitwise | goal |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['family']} | {r['loss']:.4f} | {r['loss_gap']:.2e} | {r['logit_gap']:.2e} | "
              f"{'yes' if r['bitwise'] else 'no'} | {'met' if r['met'] else 'NOT MET'} |")
    return 0 if all(r["met"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
