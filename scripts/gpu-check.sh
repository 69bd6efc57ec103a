#!/usr/bin/env bash
# One-call check of the CUDA path on a GPU machine that reaches no package registry (an
# H100 / H200 with Python, torch, transformers and peft). Prepare it here:
#
#   cargo build --release --features cuda --bin cmoe
#   mkdir -p target/gpu && cp target/release/cmoe target/gpu/cmoe && strip target/gpu/cmoe
#
# and carry target/gpu/cmoe (with the repository's tracked fixtures: tests/fixtures,
# assets/llava-mini, configs) to the machine; then, from the repository root there:
#
#   scripts/gpu-check.sh [OUT_DIR]
#
# It checks, in this order, in under 8 minutes:
# 1. parity on cuda: the two tiny HF fixtures' logits against the committed transformers
#    references (max |difference| <= 1e-3) and greedy tokens equal to transformers';
# 2. the smoke run on cuda (cmoe train --preset smoke), which must write its report;
# 3. a 7B-shaped training step (configs/bench/llava-7b-shaped.json: hidden 4096, MLP 11008,
#    2 decoder layers, batch 4 x 677 tokens, the paper's r64 / alpha 128 and 8 experts) for
#    LLaVA-CMoE and plain LoRA, beside the PyTorch twin (PEFT for LoRA) on the same GPU:
#    tokens/s, peak GPU memory, and MFU against the GPU's FP32 peak (the steps run in f32).
# Everything measured goes to OUT_DIR (default gpu-check/), summary.json last.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${1:-gpu-check}"
CMOE="${CMOE:-target/gpu/cmoe}"
PYTHON="${PYTHON:-python3}"
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$OUT/gpu.txt"

echo "== 1. parity on cuda"
for model in tiny-llava tiny-llava-b; do
  dir="tests/fixtures/$model"
  ids=$("$PYTHON" -c "import json; print(','.join(map(str, json.load(open('$dir/reference.json'))['prompt_ids'])))")
  "$CMOE" forward --backend cuda --model "$dir" --input-ids "$ids" \
    --pixel-values "$dir/reference.safetensors" --out "$OUT/$model-logits.safetensors"
  prompt=$("$PYTHON" -c "import json; print(json.load(open('$dir/reference.json'))['prompt'])")
  steps=$("$PYTHON" -c "import json; print(json.load(open('$dir/reference.json'))['greedy_max_new_tokens'])")
  "$CMOE" generate --backend cuda --model "$dir" --pixel-values "$dir/reference.safetensors" \
    --prompt "$prompt" --greedy --max-new-tokens "$steps" --json > "$OUT/$model-greedy.json"
done
"$PYTHON" - "$OUT" <<'PY'
import json, sys
from safetensors.torch import load_file
out = sys.argv[1]
result = {}
for model in ["tiny-llava", "tiny-llava-b"]:
    ref = json.load(open(f"tests/fixtures/{model}/reference.json"))
    expected = load_file(f"tests/fixtures/{model}/reference.safetensors")["logits"]
    got = load_file(f"{out}/{model}-logits.safetensors")["logits"][:, ref["logits_from"]:]
    diff = (got.float() - expected.float()).abs().max().item()
    greedy = json.load(open(f"{out}/{model}-greedy.json"))["generated_ids"]
    result[model] = {"max_logit_diff": diff, "greedy_equal": greedy == ref["greedy_ids"]}
    assert diff <= 1e-3, f"{model}: logits differ by {diff}"
    assert greedy == ref["greedy_ids"], f"{model}: greedy tokens differ"
json.dump(result, open(f"{out}/parity.json", "w"), indent=1)
print(result)
PY

echo "== 2. the smoke run on cuda"
rm -rf "$OUT/runs"
start=$(date +%s)
"$CMOE" train --backend cuda --preset smoke --runs "$OUT/runs" --name smoke
test -s "$OUT/runs/smoke/report.json"
echo "{\"smoke_seconds\": $(( $(date +%s) - start ))}" > "$OUT/smoke.json"

echo "== 3. a 7B-shaped training step, Burn (cuda) beside PyTorch on the same GPU"
shape=(--config configs/bench/llava-7b-shaped.json --batch 4 --text-tokens 100 --new-tokens 16
  --repeats 2 --eval-questions 16 --eval-batch 16 --settings paper --json)
"$CMOE" bench --backend cuda --continual "${shape[@]}" | tail -1 > "$OUT/burn.json"
"$PYTHON" scripts/bench_torch_continual.py --device cuda "${shape[@]}" | tail -1 > "$OUT/pytorch.json"
"$PYTHON" - "$OUT" <<'PY'
import json, sys
out = sys.argv[1]
burn, torch_ = json.load(open(f"{out}/burn.json")), json.load(open(f"{out}/pytorch.json"))
gpu = open(f"{out}/gpu.txt").read().strip()
# FP32 (non-tensor-core) peak of the GPU, TFLOPS: H100 / H200 SXM 67.
peak = 67e12
# A training step with a frozen base: about 4 x frozen parameters x tokens (forward, and the
# backward pass's input gradients; the adapters' own work is small).
params = burn["parameters"]
tokens = burn["continual"]["step_tokens"]
flops = 4 * params * tokens
rows = {}
for case in ["cmoe_step", "lora_step"]:
    ours, theirs = burn["continual"][f"{case}_s"], torch_[f"{case}_s"]
    rows[case] = {
        "burn_tok_s": tokens / ours, "pytorch_tok_s": tokens / theirs, "burn_over_pytorch": theirs / ours,
        "burn_mfu": flops / ours / peak, "pytorch_mfu": flops / theirs / peak,
    }
summary = {"gpu": gpu, "steps": rows, "pytorch_peak_gpu_mb": torch_.get("peak_gpu_mb"),
           "eval_tok_s": {"burn": burn.get("eval_tok_s"), "pytorch": torch_.get("eval_tok_s")}}
json.dump(summary, open(f"{out}/summary.json", "w"), indent=1)
print(json.dumps(summary, indent=1))
PY
