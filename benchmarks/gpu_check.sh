#!/usr/bin/env bash
# kvpool's GPU check: one command on a GPU machine with no network, from the repository root.
#
#   bash benchmarks/gpu_check.sh          # results in ${OUT:-benchmarks/out}, the table printed last
#
# Stages (each under its own `timeout`, cut further so the whole run ends within the budget):
#   1. pip install --no-build-isolation --no-deps -e .   (falls back to PYTHONPATH=src)
#   2. GPU tests: the kernel tests on CUDA (bf16, fp8, poisoned outputs, fresh data), then `pytest tests -m gpu`
#   3. benchmarks: copy ceiling, gather_kv / write_kv / copy_blocks, paged_decode sweep (pytest-benchmark)
#   3b. issue 15: paged_prefill (8 x (4096+1024), 1 x 16K) and the mixed batch vs vLLM's unified attention and
#       SDPA-flash; the eager decode table is bench_decode's batch 1-8 rows, judged in the report
#   3d. issue 14: host tier offload/reload of 64 Llama-8B blocks vs the pinned copy ceiling, no cost on a miss
#   4. compute-sanitizer --tool memcheck on a small case of every kernel
#   5. benchmarks/gpu_validate.py: plan and start-up sizing vs the live GPU (KVPOOL_SKIP_VALIDATE=1 skips it)
#   6. the demo at --tp 2 on one GPU; 7. the elastic pool's benchmark and demo (issue 16)
#   8. benchmarks/gpu_report.py: JSON + Markdown table, printed last
# Results are written as they come (benchmark rows as JSON lines), so a stage that times out still
# leaves its data. Budget: KVPOOL_GPU_BUDGET_S (default 475 s: 400 + 75 for the elastic stage) for the whole script.
#
# The vLLM peers are fetched beforehand where the registry is reachable (the GPU machine has no network, and
# ../shared does not travel with the repository), from the repository root, then `.peers` is carried along:
#   for p in vllm_triton_decode vllm_unified_attention; do python ../shared/peers/$p.py fetch && cp ../shared/peers/$p.py .peers/; done
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-benchmarks/out}"
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"
export KVPOOL_BENCH_ROWS="$OUT/rows.jsonl"
: > "$KVPOOL_BENCH_ROWS"
rm -f "$OUT"/bench_*.json "$OUT/sanitizer.json" "$OUT"/tests_*.log  # no stale results from an earlier run
START=$(date +%s)
BUDGET="${KVPOOL_GPU_BUDGET_S:-475}"
PY="${PYTHON:-python}"

log() { echo "[gpu_check +$(( $(date +%s) - START ))s] $*"; }

# limit MAX_S RESERVE_S: seconds a stage may take: at most MAX_S, and never into the RESERVE_S seconds
# kept for the stages after it.
limit() {
  local left=$(( BUDGET - ($(date +%s) - START) - $2 ))
  echo $(( left < $1 ? left : $1 ))
}

# stage NAME MAX_S RESERVE_S CMD...: run CMD under `timeout`, output in $OUT/NAME.log
stage() {
  local name="$1" lim; lim=$(limit "$2" "$3"); shift 3
  if (( lim < 5 )); then
    log "$name: skipped (budget spent)"; echo "skipped: budget spent" > "$OUT/$name.log"; return 0
  fi
  log "$name: start (limit ${lim}s)"
  timeout --kill-after=5 "$lim" "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  log "$name: rc=$rc$( (( rc == 124 )) && echo ' (timed out)')"
  tail -n 3 "$OUT/$name.log" | sed 's/^/    /'
  return 0
}

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader > "$OUT/gpu.txt" 2>&1 || true
log "GPU: $(cat "$OUT/gpu.txt")"
for f in vllm_triton_decode_attention.py vllm_triton_unified_attention.py vllm_triton_attention_helpers.py \
         vllm_unified_attention.py; do
  [[ -f ".peers/$f" ]] || log "peer missing: .peers/$f (its baseline is skipped; see the fetch line at the top)"
done
"$PY" -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)" \
  | tee "$OUT/versions.txt"

# 1. install (the C++ allocator builds here); the kernels import without it
if [[ "${KVPOOL_SKIP_INSTALL:-0}" == 1 ]]; then
  log "install: skipped (KVPOOL_SKIP_INSTALL=1)"
else
  stage install 50 215 "$PY" -m pip install --no-build-isolation --no-deps -e .
fi
if ! "$PY" -c "import kvpool" 2>/dev/null; then
  export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
  log "install failed: using PYTHONPATH=src"
fi

# 2. GPU tests. The kernel tests compile a few dozen Triton variants (CPU-bound), so three pytest
#    processes share them (a fourth runs the attention kernels of issue 15); the other `-m gpu` tests
#    (memory sizing among them) run alone afterwards.
lim=$(limit 80 185)
if (( lim >= 5 )); then
  log "tests_kernels_gpu: start (limit ${lim}s, 3-4 processes)"
  PYT=("$PY" -m pytest -m gpu -q -rfE -p no:cacheprovider)
  timeout --kill-after=5 "$lim" "${PYT[@]}" tests/test_kernels_decode.py tests/test_kernels_sinks.py \
    > "$OUT/tests_kernels_decode_gpu.log" 2>&1 &
  timeout --kill-after=5 "$lim" "${PYT[@]}" tests/test_kernels_write.py tests/test_kernels_gather.py \
    > "$OUT/tests_kernels_write_gather_gpu.log" 2>&1 &
  timeout --kill-after=5 "$lim" "${PYT[@]}" tests/test_kernels_copy.py tests/test_kernels_backend.py \
    tests/test_kernels_block_stage.py \
    > "$OUT/tests_kernels_copy_backend_gpu.log" 2>&1 &
  # issue 15's attention kernels (paged_prefill, mixed batches): a fourth process, the files that exist
  ATTN_TESTS=($(shopt -s nullglob; echo tests/test_kernels_prefill*.py tests/test_kernels_attention*.py \
                tests/test_kernels_mixed*.py))
  if (( ${#ATTN_TESTS[@]} )); then
    timeout --kill-after=5 "$lim" "${PYT[@]}" "${ATTN_TESTS[@]}" > "$OUT/tests_kernels_attention_gpu.log" 2>&1 &
  fi
  wait
  for f in "$OUT"/tests_kernels_*_gpu.log; do log "  $(basename "$f"): $(tail -n 1 "$f")"; done
fi
stage tests_gpu 30 170 "$PY" -m pytest tests -m gpu -q -rfE -p no:cacheprovider --ignore-glob='tests/test_kernels_*.py'

# 3. benchmarks (medians of CUDA-event timings; figures in extra_info and in rows.jsonl)
stage bench_memory 30 150 "$PY" -m pytest benchmarks/bench_memory.py -q -p no:cacheprovider \
  --benchmark-json="$OUT/bench_memory.json" -s
stage bench_decode 90 90 "$PY" -m pytest benchmarks/bench_decode.py -q -p no:cacheprovider \
  --benchmark-json="$OUT/bench_decode.json" -s

# 3b. issue 15: paged_prefill and the mixed batch, each output checked against the reference before timing
stage bench_prefill 60 110 "$PY" -m pytest benchmarks/bench_prefill.py -q -rs -p no:cacheprovider \
  --benchmark-json="$OUT/bench_prefill.json" -s
stage bench_mixed 45 65 "$PY" -m pytest benchmarks/bench_mixed.py -q -rs -p no:cacheprovider \
  --benchmark-json="$OUT/bench_mixed.json" -s
# 3c. issue 16: the VMM layer's grow by 1 GiB (target <= 10 ms) and the wake of a 40 GiB pool (<= 200 ms),
#     2 and 32 MiB chunks, memory given back on sleep (cudaMemGetInfo); figures printed in its log
stage bench_vmm 40 60 "$PY" -m pytest benchmarks/bench_vmm.py -q -rs -p no:cacheprovider -s

# 3d. host tier (issue 14): BlockCopier offload/reload of 64 blocks vs one pinned copy_ (target >= 80%), the naive
# block x layer copies, and a decode step's graph time with the tier on (nothing to reload) vs off (<= 2%)
stage bench_host_tier 40 62 "$PY" -m pytest benchmarks/bench_host_tier.py -q -p no:cacheprovider \
  --benchmark-json="$OUT/bench_host_tier.json" -s

# 4. memcheck on a small case of every kernel
# (the driver gets the stage's limit minus 3 s, so it writes its JSON even when memcheck runs long)
san=$(limit 80 62)
stage sanitizer 80 62 "$PY" benchmarks/sanitize_kernels.py --out "$OUT/sanitizer.json" --timeout $(( san > 8 ? san - 3 : 5 ))

# 5. planner and size_kv_pool against the live GPU (Llama-3.1-8B shape, random weights)
if [[ -f benchmarks/gpu_validate.py && "${KVPOOL_SKIP_VALIDATE:-0}" != 1 ]]; then
  stage gpu_validate 75 5 "$PY" benchmarks/gpu_validate.py
fi

# 6. the demo at --tp 2 on this one GPU: two ranks share it over gloo (NCCL refuses two ranks on one
#    device), CUDA pages and Triton kernels on both, every request compared with transformers
stage demo_tp2_one_gpu 40 40 "$PY" -m kvpool.demo --tp 2 --device cuda --backend gloo --check-hf --no-progress

# 7. the elastic pool (issue 16; its CUDA-backend tests ran in stage 2 with -m gpu, its memcheck case in stage 4):
#    grow by 1 GiB, wake, decode/write on elastic vs static pages, mem_get_info after shrink/sleep, a graph
#    captured before a grow; then the demo growing and shrinking its pool on CUDA
stage bench_elastic 60 15 "$PY" -m pytest benchmarks/bench_elastic.py -q -p no:cacheprovider \
  --benchmark-json="$OUT/bench_elastic.json" -s
stage demo_elastic 15 0 "$PY" -m kvpool.demo --elastic --device cuda --check-hf --no-progress

# 8. report: JSON + table, the table printed last
log "report"
"$PY" benchmarks/gpu_report.py --out-dir "$OUT" --rows "$KVPOOL_BENCH_ROWS" \
  --bench-json "$OUT/bench_memory.json" "$OUT/bench_decode.json" "$OUT/bench_prefill.json" "$OUT/bench_mixed.json" \
  "$OUT/bench_host_tier.json" "$OUT/bench_elastic.json" --sanitizer "$OUT/sanitizer.json" \
  --tests-log "$OUT"/tests_kernels_*_gpu.log "$OUT/tests_gpu.log" > "$OUT/table.txt" 2>&1
if [[ -f "$OUT/gpu_validate.log" ]]; then
  echo "---- gpu_validate.py (last 40 lines) ----"; tail -n 40 "$OUT/gpu_validate.log"
fi
log "done in $(( $(date +%s) - START ))s; files in $OUT"
echo
cat "$OUT/table.txt"
