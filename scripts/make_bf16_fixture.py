#!/usr/bin/env python3
"""Reference logits of the tiny-llava fixture run by transformers in bfloat16 (CPU, eager
attention), for the bf16 parity test (tests/parity_bf16.rs) and the GPU check.

Writes tests/fixtures/tiny-llava/reference-bf16.safetensors with, at the last TAIL positions
of the prompt (each attends to the image and all the text before it):
  logits_bf16  [1, TAIL, vocab]  bf16: transformers with every weight and activation in bf16
                                 (softmax and RMSNorm upcast to f32 inside, as LLaVA-1.5 runs);
  logits_f32   [1, TAIL, vocab]  f32: the same bf16-rounded weights run in f32, the "truth"
                                 both bf16 runs are measured against;
on the prompt ids and pixel values of reference.json / reference.safetensors.

Requires torch, transformers (>= 5), safetensors. Run: python scripts/make_bf16_fixture.py
Deterministic; only its output is committed, CI never runs it.
"""

import json
from pathlib import Path

import torch
import transformers
from safetensors.torch import load_file, save_file
from transformers import LlavaForConditionalGeneration

ROOT = Path(__file__).resolve().parent.parent
FIXTURE = ROOT / "tests" / "fixtures" / "tiny-llava"
TAIL = 6


def main() -> None:
    torch.manual_seed(0)
    reference = json.loads((FIXTURE / "reference.json").read_text())
    pixels = load_file(str(FIXTURE / "reference.safetensors"))["pixel_values"]
    input_ids = torch.tensor([reference["prompt_ids"]])
    out = {}
    for name, dtype in [("logits_bf16", torch.bfloat16), ("logits_f32", torch.float32)]:
        model = LlavaForConditionalGeneration.from_pretrained(
            FIXTURE, dtype=torch.bfloat16, attn_implementation="eager"
        ).eval()
        model = model.to(dtype)  # bf16-rounded weights either way
        with torch.no_grad():
            logits = model(input_ids=input_ids, pixel_values=pixels.to(dtype)).logits
        out[name] = logits[:, -TAIL:, :].contiguous()
    gap = (out["logits_bf16"].float() - out["logits_f32"]).abs().max().item()
    save_file(
        out,
        str(FIXTURE / "reference-bf16.safetensors"),
        metadata={
            "generator": f"scripts/make_bf16_fixture.py, transformers {transformers.__version__}, "
            f"torch {torch.__version__}",
            "bf16_vs_f32_max_abs": f"{gap:.6f}",
        },
    )
    print(f"transformers bf16 against f32 on the same weights: max |logit diff| {gap:.4f}")


if __name__ == "__main__":
    main()
