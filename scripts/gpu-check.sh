#!/usr/bin/env bash
# The first hour on a GPU: every check of the CUDA path in one call, on a machine that reaches
# no package registry (an H100 / H200 with the NVIDIA driver; Python with torch, transformers
# and peft for the PyTorch twin). Prepare here, then carry target/gpu-pack with the tree:
#
#   cargo xtask gpu-pack            # target/gpu-pack/cmoe.xz: --no-default-features --features cuda
#   scripts/gpu-check.sh OUT        # on the GPU machine, from the repository root
#
# Steps (each runs even when an earlier one failed, and records its own status):
#  0. preflight: the GPU (nvidia-smi), libnvrtc and the CUDA headers NVRTC compiles against
#     (from $CUDA_PATH, /usr/local/cuda, or torch's nvidia wheels), the binary, Python's torch.
#     A failed preflight stops the check with the reason (nothing else could run).
#  1. parity-f32, 2. parity-bf16: the tiny fixtures against transformers (`cmoe parity`);
#  3. smoke: `cmoe train --preset smoke` to its report;
#  4. plan: the 7B memory plan (`cmoe --json train --dry-run` on the 7B config.json);
#  5. memory: a 7B-wide decoder training pass (bf16 base, 8 trainable experts r64, 4 rows of
#     680 tokens, as the 7B config's micro-batch) at 2 and 4 layers, each in its own process,
#     GPU memory polled with nvidia-smi: bytes per layer and per token per layer, beside the plan;
#  6. bench: a 7B-shaped training step, Burn beside the PyTorch twin on the same GPU, both with
#     a bf16 base and TF32 allowed for f32 products; MFU over the decoder's per-token parameters.
# OUT receives two files: summary.json (every step's status, duration and figures) and
# gpu-check.tar.gz (every log and JSON). GPU_CHECK_REHEARSAL=1 runs every step on the CPU
# (flex, the project's small shapes, a stand-in for nvidia-smi that reports the cmoe processes'
# resident memory), so that the script itself is tested before a GPU is lent (CI runs it).
set -uo pipefail
cd "$(dirname "$0")/.."
REHEARSAL="${GPU_CHECK_REHEARSAL:-0}"
PYTHON="${PYTHON:-python3}"
mkdir -p "${1:-gpu-check}"
OUT=$(cd "${1:-gpu-check}" && pwd)
WORK="$OUT/work"
rm -rf "$WORK" "$OUT/summary.json" "$OUT/gpu-check.tar.gz"
mkdir -p "$WORK"
STEPS="$WORK/steps.jsonl"
: > "$STEPS"

if [ "$REHEARSAL" = 1 ]; then
  BACKEND=flex
  CMOE="${CMOE:-target/release/cmoe}"
  WIDE_CONFIG=configs/bench/llava-mini.json   # the memory pass's widths
  SEQ=72; ROWS=2; LAYERS_A=2; LAYERS_B=4; RANK=8
  BENCH_CONFIG=configs/bench/llava-mini.json; BENCH_ROWS=2; BENCH_TEXT=20; BENCH_SETTINGS=mini
  smi() {  # stand-in: the cmoe processes' resident memory in MiB, as memory.used
    case "$*" in
      *memory.used*) ps -C cmoe -o rss= 2>/dev/null | awk '{s += $1} END {print int(s / 1024)}' ;;
      *) echo "CPU rehearsal (stand-in for nvidia-smi), 0 MiB, 0" ;;
    esac
  }
else
  BACKEND=cuda
  CMOE="${CMOE:-$WORK/bin/cmoe}"
  WIDE_CONFIG=tests/fixtures/llava-1.5-7b-hf/config.json
  SEQ=680; ROWS=4; LAYERS_A=2; LAYERS_B=4; RANK=64
  BENCH_CONFIG=configs/bench/llava-7b-shaped.json; BENCH_ROWS=4; BENCH_TEXT=100; BENCH_SETTINGS=paper
  smi() { nvidia-smi "$@"; }
fi

# Records one step: `step NAME command...`; its output goes to work/NAME.log, its status and
# duration to steps.jsonl, with the last line of the log as the detail when it failed.
step() {
  local name=$1; shift
  local start rc detail ms
  start=$(date +%s%N)
  echo "== $name"
  ( "$@" ) > "$WORK/$name.log" 2>&1
  rc=$?
  ms=$(( ($(date +%s%N) - start) / 1000000 ))
  detail=$(tail -n 1 "$WORK/$name.log" | tr -d '"\\' | cut -c1-300)
  printf '{"step": "%s", "status": "%s", "seconds": %d.%03d, "detail": "%s"}\n' \
    "$name" "$([ $rc = 0 ] && echo ok || echo failed)" $((ms / 1000)) $((ms % 1000)) "$detail" \
    >> "$STEPS"
  echo "   $([ $rc = 0 ] && echo ok || echo "FAILED: $detail")"
  return 0
}

# Writes summary.json from the steps and the JSON files, and the archive; prints the summary.
finish() {
  "$PYTHON" - "$WORK" "$OUT" "$REHEARSAL" <<'PY'
import json, os, sys
work, out, rehearsal = sys.argv[1], sys.argv[2], sys.argv[3] == "1"
def load(name):
    try:
        with open(os.path.join(work, name)) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None
steps = [json.loads(l) for l in open(os.path.join(work, "steps.jsonl")) if l.strip()]
summary = {"rehearsal": rehearsal, "steps": steps}
for name in ["gpu", "parity-f32", "parity-bf16", "smoke", "plan", "memory", "bench"]:
    value = load(name + ".json")
    if value is not None:
        summary[name] = value
json.dump(summary, open(os.path.join(out, "summary.json"), "w"), indent=1)
print(json.dumps(summary, indent=1))
PY
  tar -czf "$OUT/gpu-check.tar.gz" -C "$OUT" work && rm -rf "$WORK"
}

# ---- 0. preflight ------------------------------------------------------------------------
preflight() {
  local gpu
  gpu=$(smi --query-gpu=name,memory.total,driver_version --format=csv,noheader) || {
    echo "no GPU: nvidia-smi failed"; return 1; }
  [ -n "$gpu" ] || { echo "no GPU: nvidia-smi lists none"; return 1; }
  printf '{"gpu": "%s"}\n' "$gpu" > "$WORK/gpu.json"
  if [ "$REHEARSAL" != 1 ]; then
    mkdir -p "$WORK/bin"
    xz -dc target/gpu-pack/cmoe.xz > "$WORK/bin/cmoe" && chmod +x "$WORK/bin/cmoe" || {
      echo "cannot unpack target/gpu-pack/cmoe.xz (run cargo xtask gpu-pack and carry it)"; return 1; }
    local wheels
    wheels=$("$PYTHON" -c 'import nvidia; print(list(nvidia.__path__)[0])' 2>/dev/null)
    # NVRTC: the system's, else torch's wheel (cudarc opens libnvrtc.so or libnvrtc.so.<major>).
    if ! ldconfig -p 2>/dev/null | grep -q libnvrtc.so; then
      local lib
      lib=$(find "${CUDA_PATH:-/usr/local/cuda}" $wheels -name 'libnvrtc.so*' 2>/dev/null \
        | grep -v builtins | head -n 1)
      [ -n "$lib" ] || { echo "libnvrtc not found (CUDA toolkit or torch's nvidia wheels)"; return 1; }
      mkdir -p "$WORK/lib" && ln -sf "$(readlink -f "$lib")" "$WORK/lib/libnvrtc.so"
      echo "nvrtc: $lib"
    fi
    # Headers: cubecl-cuda compiles with --include-path=$CUDA_PATH/include (cuda_fp16.h, ...).
    if [ ! -f "${CUDA_PATH:-/usr/local/cuda}/include/cuda_fp16.h" ]; then
      local header
      header=$(find /opt/cuda /usr/include $wheels -name cuda_fp16.h 2>/dev/null | head -n 1)
      [ -n "$header" ] || { echo "CUDA headers (cuda_fp16.h) not found: set CUDA_PATH"; return 1; }
      mkdir -p "$WORK/cuda" && ln -sfn "$(dirname "$header")" "$WORK/cuda/include"
      echo "headers: $(dirname "$header")"
    fi
  fi
  "$CMOE" --version || { echo "$CMOE does not run"; return 1; }
  "$PYTHON" -c 'import torch, transformers; print("torch", torch.__version__, "cuda", torch.cuda.is_available())' \
    || echo "no torch: the PyTorch twin of step 6 is skipped"
  echo "preflight passed: $gpu"
}
step preflight preflight
if ! tail -n 1 "$STEPS" | grep -q '"ok"'; then
  echo "preflight failed: $(tail -n 1 "$WORK/preflight.log")"
  finish
  exit 2
fi
[ -d "$WORK/lib" ] && export LD_LIBRARY_PATH="$WORK/lib:${LD_LIBRARY_PATH:-}"
[ -d "$WORK/cuda" ] && export CUDA_PATH="$WORK/cuda"

# ---- 1-2. parity -------------------------------------------------------------------------
parity() {
  local dtype=$1 first=1
  echo "[" > "$WORK/parity-$dtype.json.part"
  local ok=0 model
  for model in tiny-llava tiny-llava-b; do
    [ "$dtype" = bf16 ] && [ "$model" = tiny-llava-b ] && continue  # bf16 references: tiny-llava
    [ $first = 1 ] || echo "," >> "$WORK/parity-$dtype.json.part"
    first=0
    "$CMOE" --json parity --backend "$BACKEND" --model "tests/fixtures/$model" --dtype "$dtype" \
      >> "$WORK/parity-$dtype.json.part" || ok=1
  done
  echo "]" >> "$WORK/parity-$dtype.json.part"
  mv "$WORK/parity-$dtype.json.part" "$WORK/parity-$dtype.json"
  cat "$WORK/parity-$dtype.json"
  return $ok
}
step parity-f32 parity f32
step parity-bf16 parity bf16

# ---- 3. smoke ----------------------------------------------------------------------------
smoke() {
  local start=$SECONDS
  "$CMOE" train --backend "$BACKEND" --preset smoke --runs "$WORK/runs" --name smoke || return 1
  test -s "$WORK/runs/smoke/report.json" || return 1
  printf '{"seconds": %d, "report": %s}\n' $((SECONDS - start)) "$(cat "$WORK/runs/smoke/report.json")" \
    > "$WORK/smoke.json"
  rm -rf "$WORK/runs/smoke/state" "$WORK/runs/smoke/data"   # keep the report and logs only
}
step smoke smoke

# ---- 4. the 7B plan ----------------------------------------------------------------------
plan() {
  # The dry run fails here (no weights, no CoIN data): its JSON still holds the plan.
  "$CMOE" --json train --dry-run --backend cuda --config configs/llava-1.5-7b-coin.toml \
    --model tests/fixtures/llava-1.5-7b-hf --data-root "$WORK/no-data" --runs "$WORK/runs" \
    --name plan > "$WORK/plan-dry-run.json"
  "$PYTHON" -c '
import json, sys
plan = json.load(open(sys.argv[1]))["memory"]
json.dump(plan, open(sys.argv[2], "w"), indent=1)
print("peak %.2f GiB, %d bytes per token per layer" % (plan["peak_bytes"] / 2**30,
      plan["activation_bytes_per_token_per_layer"]))' "$WORK/plan-dry-run.json" "$WORK/plan.json"
}
step plan plan

# ---- 5. memory at 2 and 4 layers ---------------------------------------------------------
# Runs one training pass in its own process while polling the GPU's used memory every 100 ms;
# prints the peak in MiB above the idle reading.
memory_pass() {
  local layers=$1 idle peak pid
  idle=$(smi --query-gpu=memory.used --format=csv,noheader,nounits | head -n 1)
  "$CMOE" --json memory-proxy --backend "$BACKEND" --config "$WIDE_CONFIG" --cases decoder \
    --layers "$layers" --rows "$ROWS" --seq "$SEQ" --rank "$RANK" --experts 8 \
    > "$WORK/memory-$layers.json" &
  pid=$!
  peak=0
  while kill -0 $pid 2>/dev/null; do
    local now
    now=$(smi --query-gpu=memory.used --format=csv,noheader,nounits | head -n 1)
    [ "${now:-0}" -gt "$peak" ] && peak=$now
    sleep 0.1
  done
  wait $pid || return 1
  echo $((peak - idle))
}
memory() {
  local a b
  a=$(memory_pass $LAYERS_A) || return 1
  b=$(memory_pass $LAYERS_B) || return 1
  "$PYTHON" - "$WORK" "$a" "$b" "$LAYERS_A" "$LAYERS_B" "$ROWS" "$SEQ" <<'PY'
import json, sys
work, a, b, la, lb, rows, seq = sys.argv[1], *map(int, sys.argv[2:])
mib = 2**20
per_layer = (b - a) * mib / (lb - la)
proxy = json.load(open(f"{work}/memory-{lb}.json"))
shape = proxy["shape"]
concatenated = 4 * shape["experts"] * shape["rank"] * 3 * (shape["hidden"] + shape["intermediate"])
measured = (per_layer - concatenated) / (rows * seq)
plan = json.load(open(f"{work}/plan.json")) if __import__("os").path.exists(f"{work}/plan.json") else {}
result = {
    "peak_mib": {str(la): a, str(lb): b},
    "bytes_per_layer": per_layer,
    "bytes_per_token_per_layer": measured,
    "planned_bytes_per_token_per_layer": plan.get("activation_bytes_per_token_per_layer"),
    "rows": rows, "seq": seq,
}
json.dump(result, open(f"{work}/memory.json", "w"), indent=1)
print(json.dumps(result))
PY
}
step memory memory

# ---- 6. the training step beside PyTorch -------------------------------------------------
bench() {
  local shape=(--config "$BENCH_CONFIG" --batch "$BENCH_ROWS" --text-tokens "$BENCH_TEXT"
    --new-tokens 16 --repeats 2 --eval-questions 16 --eval-batch 16 --settings "$BENCH_SETTINGS"
    --base-dtype bf16 --json)
  "$CMOE" bench --backend "$BACKEND" --continual "${shape[@]}" | tail -n 1 > "$WORK/bench-burn.json" \
    || return 1
  local device=cuda
  [ "$REHEARSAL" = 1 ] && device=cpu
  if "$PYTHON" -c 'import torch, transformers, peft' 2>/dev/null; then
    "$PYTHON" scripts/bench_torch_continual.py --device $device "${shape[@]}" | tail -n 1 \
      > "$WORK/bench-pytorch.json" || return 1
  fi
  "$PYTHON" - "$WORK" "$BENCH_CONFIG" "$(smi --query-gpu=name --format=csv,noheader | head -n 1)" <<'PY'
import json, os, sys
work, config_path, gpu = sys.argv[1], sys.argv[2], sys.argv[3]
burn = json.load(open(f"{work}/bench-burn.json"))
torch_ = json.load(open(f"{work}/bench-pytorch.json")) if os.path.exists(f"{work}/bench-pytorch.json") else None
t = json.load(open(config_path))["text_config"]
h, m, heads = t["hidden_size"], t["intermediate_size"], t["num_attention_heads"]
kv = t.get("num_key_value_heads", heads)
# Parameters every token goes through: the decoder layers' projections (not the embeddings,
# which are a lookup, nor CLIP, which runs once per image, nor the head, which runs at the
# answer positions only).
per_token = t["num_hidden_layers"] * (2 * h * h + 2 * h * h * kv // heads + 3 * h * m)
# bf16 dense tensor-core peak (H100 / H200 SXM 989 TFLOPS; H100 PCIe 756).
peak = 756e12 if "PCIe" in gpu else 989e12
tokens = burn["continual"]["step_tokens"]
# A step with a frozen base: forward (2 flops a parameter) and the input gradients (2 more).
flops = 4 * per_token * tokens
rows = {}
for case in ["cmoe_step", "lora_step"]:
    ours = burn["continual"][f"{case}_s"]
    row = {"burn_tok_s": tokens / ours, "burn_mfu": flops / ours / peak}
    if torch_:
        theirs = torch_[f"{case}_s"]
        row.update({"pytorch_tok_s": tokens / theirs, "pytorch_mfu": flops / theirs / peak,
                    "burn_over_pytorch": theirs / ours})
    rows[case] = row
result = {"gpu": gpu, "per_token_parameters": per_token, "peak_flops": peak, "steps": rows,
          "pytorch": "measured" if torch_ else "skipped: no torch, transformers and peft"}
json.dump(result, open(f"{work}/bench.json", "w"), indent=1)
print(json.dumps(result))
PY
}
step bench bench

finish
grep -q '"failed"' "$OUT/summary.json" && exit 1
exit 0
