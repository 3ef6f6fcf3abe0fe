#!/usr/bin/env bash
# One call on the device machine (see README "GPU check"): install the carried wheels, assemble the
# default model from the parts carried so far, run the GPU tests, generate with the default model on
# the GPU, evaluate every quantization preset (the accuracy table), and print a short summary last.
#   bash scripts/gpu_check.sh [tests] [generate] [eval] [ablate] [kernels] [tune] [bench]   (default: tests generate eval)
#   cutlass: the CUTLASS kernels' GPU tests and bench/cutlass_sweep.py --op $CUTLASS_OPS $CUTLASS_ARGS (.cutlass carried)
#   kernels: kernel tests (W4A16/W4A8/W8A8, QUIK W4A4, COMET W4Ax, 2:4, the ops and dispatch); tune: bench/tune_kernels.py $TUNE_ARGS; bench: lowbit bench kernels $BENCH_ARGS;
#   e2e: quantize the default model (w4a16, w4a8, w8a8-fp8) and generate with it on the kernels
#   engine: engine tests on the GPU (decode-attention kernel, quantized KV, CUDA-graph decode, custom ops)
#   eval-15b: the accuracy table of qwen2.5-coder-1.5b ($EVAL15_SCHEMES, default every preset) in fp32;
#             its GGUF (1.1 GB) travels as 19 parts (scripts/split_asset.sh qwen15b ...), one per call
#   gptq-speed: bench/gptq_speed.py $GPTQ_ARGS (calibration time at Llama-3-8B / 70B shapes, random weights)
#   bench-e2e: lowbit bench e2e $E2E_ARGS (Llama-3-8B shape, random weights; transformers baseline)
#   profile: bench/profile_decode.py $PROFILE_ARGS (kernel time per decode step; GEMMs timed in CUDA graphs)
#   load: lowbit bench serve smollm2-135m $LOAD_ARGS (the server's load test, on the default model)
#   host: bench/host_time.py --profile (host time of one eager GEMM per format beside torch.matmul)
#   loadmem: bench/load_memory.py (peak GPU memory loading a random 8B-shaped W4 checkpoint)
#   gen-rand: lowbit generate at batch 1 and 4 on a random Llama-3.2-1B-shaped checkpoint beside bench e2e
#             at the same shape (issue 17 item 4)
#   prefill-profile: bench/prefill_profile.py (GPU busy time against wall time of one engine prefill)
#   recipe-trace: bench/recipe_trace.py on the GPU for $TRACE_SCHEMES (default w4a8 w4a16-2:4), the default
#             model in fp32, 128 windows: every smoothing / clipping / GPTQ decision per layer, written to
#             $OUT/trace-SCHEME-cuda.pt for `recipe_trace.py --compare` against a CPU trace (issue 21)
#   recipe-spread: recipe-trace with --eval, unperturbed and under $SPREAD_SEEDS 1e-7 perturbations,
#             $SPREAD_JOBS at once: the perplexity spread rounding alone makes on the GPU (issue 21)
#   prefill: bench e2e fp16 prefill against transformers at batch 1 and 16, prompts 512, 2048, 4096 (item 6)
#   ncu: Nsight Compute on what dispatch runs, per "PATH:MODEL:LAYER:M" in $NCU_CELLS (default: W4A16 on
#        the 8B gate+up at M = 1, 16, 64, 256, 1024): duration, DRAM / SM throughput, occupancy,
#        issue efficiency, registers; the full reports come back under $OUT/ncu/
#
# The default model's GGUF (98 MB) is larger than what one call may carry (64 MiB), so it travels in
# two parts over two calls to the same warm machine; parts are kept in /tmp/lowbit-parts in between.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 LOWBIT_CACHE=/tmp/lowbit-cache
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
fi
# a warm machine keeps what an earlier call installed and unpacked: later calls need not carry it again
[ -d /tmp/site ] && export PYTHONPATH=/tmp/site
[ -d /tmp/cutlass/include ] && export LOWBIT_CUTLASS_DIR=/tmp/cutlass
export PYTHONPATH="${PYTHONPATH:+$PYTHONPATH:}$PWD"
OUTDIR=${OUT:-/tmp/out}; mkdir -p "$OUTDIR"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
python3 -c "import torch, transformers; from importlib.metadata import version; print('torch', torch.__version__, 'transformers', transformers.__version__, 'gguf', version('gguf'))"

# Files larger than one call may carry travel in parts over several calls to the same warm machine
# (.gpu_assets*/NAME.partI, NAME.nparts, NAME.sha256); parts are kept in /tmp/lowbit-parts in between.
mkdir -p /tmp/lowbit-parts
cp .gpu_assets*/* /tmp/lowbit-parts/ 2>/dev/null
assemble() {  # assemble NAME TARGET: 0 when TARGET exists or was assembled from all its parts, verified
  local name=$1 target=$2 dir=/tmp/lowbit-parts n i
  [ -f "$target" ] && return 0
  [ -f "$dir/$name.nparts" ] && [ -f "$dir/$name.sha256" ] || return 1
  n=$(cat "$dir/$name.nparts")
  for ((i = 0; i < n; i++)); do [ -f "$dir/$name.part$i" ] || { echo "$name: part $i of $n not carried yet"; return 1; }; done
  mkdir -p "$(dirname "$target")"
  for ((i = 0; i < n; i++)); do cat "$dir/$name.part$i"; done > "$target.tmp"
  if [ "$(sha256sum < "$target.tmp" | cut -d' ' -f1)" = "$(cat "$dir/$name.sha256")" ]; then
    mv "$target.tmp" "$target"
  else
    echo "$name: assembled file has the wrong checksum"; rm -f "$target.tmp"; return 1
  fi
}
model=$LOWBIT_CACHE/assets/smollm2-135m/SmolLM2-135M-Instruct.Q4_1.gguf
have_model=no
assemble gguf "$model" && have_model=yes
echo "default model present: $have_model"
# The prepared wiki corpus travels as files (the device machine reaches no package index to build it).
if [ -d .gpu_corpus/wiki ] && [ ! -d "$LOWBIT_CACHE/corpora/wiki" ]; then
  mkdir -p "$LOWBIT_CACHE/corpora" && cp -r .gpu_corpus/wiki "$LOWBIT_CACHE/corpora/"
fi

stages=${*:-tests generate eval}
# with pytest-xdist carried (.whl), the kernel and engine tests run in parallel workers: most of
# their time is Triton compiling on the CPU, which a 16-core host spreads (PYTEST_WORKERS=0: serial)
par=""
if [ "${PYTEST_WORKERS:-8}" != 0 ] && python3 -c "import xdist" 2>/dev/null; then par="-n ${PYTEST_WORKERS:-8}"; fi
want() { case " $stages " in *" $1 "*) return 0;; esac; return 1; }

tests="skipped"
if want tests; then
marker="gpu and not asset"; [ $have_model = yes ] && marker="gpu"
python3 -m pytest -q -p no:cacheprovider $par -m "$marker" tests/test_gpu.py 2>&1 | tee "$OUTDIR/pytest.log"
tests=$(tail -n 1 "$OUTDIR/pytest.log")
fi

gen="skipped"
if [ $have_model = yes ] && want generate; then
  python3 -m lowbit.cli generate smollm2-135m --device cuda \
    --prompt "Explain in two sentences why quantizing an LLM to 4 bits makes it faster to serve." \
    --max-new-tokens 96 2>&1 | tee "$OUTDIR/generate.log"
  python3 -m lowbit.cli generate smollm2-135m --device cuda --dtype fp16 -n 24 \
    -p "What is the capital of France?" -p "Write a haiku about GPUs." -p "List three prime numbers." 2>&1 | tee -a "$OUTDIR/generate.log"
  gen=$(grep "tokens/s" "$OUTDIR/generate.log" | head -n 1)
fi

if [ $have_model = yes ] && want eval; then
  # fp32 on the GPU: the reference (emulated) numerics, fast. Every preset plus quantized KV caches.
  schemes=w4a16,w4a16-rtn,w8a8-fp8,w8a8-int8,w4a8,w4a8-g128,w4a4-quik,w4a4,w4a4kv4-comet,w4a16-2:4,w4a8+kv8,w4a8+kv4
  python3 -m lowbit.cli eval smollm2-135m --device cuda --dtype fp32 --schemes "$schemes" \
    --json "$OUTDIR/eval.json" 2>&1 | tr '\r' '\n' | grep -v "it/s\]\|s/it\]\|chunk/s" | tee "$OUTDIR/eval.log"
fi

kern="skipped"
if want kernels; then
  python3 -m pytest -q -p no:cacheprovider $par tests/test_kernels.py tests/test_kernel_ops.py tests/test_w4a4_kernels.py \
    tests/test_w4ax_kernels.py tests/test_sparse24_kernels.py tests/test_new_format_ops.py \
    tests/test_bench_new_formats.py tests/test_launch.py tests/test_w4a16_wgmma.py tests/test_mixed_wgmma.py \
    tests/test_gemv_frag.py 2>&1 | tee "$OUTDIR/kernels.log"
  kern=$(tail -n 1 "$OUTDIR/kernels.log")
fi
eng="skipped"
if want engine; then
  python3 -m pytest -q -p no:cacheprovider $par tests/test_attention_kernel.py tests/test_scheduler.py \
    tests/test_e2e_bench.py tests/test_fused_kernels.py tests/test_fuse.py \
    tests/test_dispatch.py 2>&1 | tee "$OUTDIR/engine.log"
  eng=$(tail -n 1 "$OUTDIR/engine.log")
fi
cut="skipped"
if want cutlass; then
  # CUTLASS kernels: headers carried as .cutlass/cutlass-include.tgz (include/, tools/util/include/, curand/),
  # libraries built on a CPU machine carried in .cutlass/kernels/ (rebuilt here, 16 nvcc jobs, when their
  # hash differs); then their GPU tests and bench/cutlass_sweep.py $CUTLASS_ARGS
  mkdir -p /tmp/cutlass "$LOWBIT_CACHE/kernels" && tar xzf .cutlass/cutlass-include.tgz -C /tmp/cutlass
  cp .cutlass/kernels/*.so "$LOWBIT_CACHE/kernels/" 2>/dev/null
  export LOWBIT_CUTLASS_DIR=/tmp/cutlass
  python3 -m lowbit.kernels.cutlass_prebuild ${CUTLASS_BUILD_ARGS:-} > "$OUTDIR/cutlass_build.log" 2>&1; tail -n 30 "$OUTDIR/cutlass_build.log"
  python3 -m pytest -q -p no:cacheprovider $par ${CUTLASS_TESTS:-tests/test_cutlass_w4a16.py tests/test_cutlass_w4a8.py} 2>&1 | tee "$OUTDIR/cutlass.log"
  cut=$(tail -n 1 "$OUTDIR/cutlass.log")
  for op in ${CUTLASS_OPS:-w4a16 w4a8-fp8 w4a8}; do
    python3 bench/cutlass_sweep.py --op $op ${CUTLASS_ARGS:-} --json "$OUTDIR/cutlass_$op.json" 2>&1 | tee -a "$OUTDIR/cutlass_sweep.log"
  done
fi
if want tune; then
  # TUNE_ARGS, e.g. "--ops w4a16 --ms 1,16": passed to the tuner; the table comes back under $OUT
  # the table is kept in /tmp between calls to the warm machine (--merge adds ops to it). Runs after
  # the cutlass stage (its libraries) and before the benchmarks, which take it with USE_TMP_TABLE=1.
  python3 bench/tune_kernels.py ${TUNE_ARGS:-} --out /tmp/lowbit-tuned.json 2>&1 | tee -a "$OUTDIR/tune.log"
  cp /tmp/lowbit-tuned.json "$OUTDIR/tuned.json"
fi
[ -f /tmp/lowbit-tuned.json ] && [ -n "${USE_TMP_TABLE:-}" ] && export LOWBIT_KERNEL_TABLE=/tmp/lowbit-tuned.json
if want bench-e2e; then
  python3 -m lowbit.cli bench e2e ${E2E_ARGS:-} --json "$OUTDIR/e2e.json" --plot "$OUTDIR/e2e.png" 2>&1 \
    | tr '\r' '\n' | grep -v "it/s\]\|s/it\]" | tee "$OUTDIR/bench-e2e.log"
fi
if want profile; then
  # where a graphed decode step's time goes, and each 8B GEMM timed inside a CUDA graph ($PROFILE_ARGS)
  python3 bench/profile_decode.py ${PROFILE_ARGS:-} 2>&1 | tee "$OUTDIR/profile.log"
fi
if [ $have_model = yes ] && want load; then
  # the load test: lowbit serve in this process on loopback, concurrent streaming clients ($LOAD_ARGS)
  python3 -m lowbit.cli bench serve smollm2-135m --device cuda --dtype fp16 ${LOAD_ARGS:-} \
    --json "$OUTDIR/load.json" 2>&1 | tee "$OUTDIR/load.log"
fi
if want host; then
  python3 bench/host_time.py --profile 2>&1 | tee "$OUTDIR/host_time.log"
fi
if want loadmem; then
  python3 bench/load_memory.py 2>&1 | tr '\r' '\n' | grep -v "it/s\]\|s/it\]" | tee "$OUTDIR/load_memory.log"
fi
if want gen-rand; then
  [ -f /tmp/rand1b/config.json ] || python3 scripts/random_checkpoint.py /tmp/rand1b
  # four prompts of one length (64 words = 64 tokens of the word-level tokenizer): one batched
  # prefill, then a steady batch of 4, the shape bench e2e times
  mapfile -t P < <(awk 'NF >= 64 { NF = 64; print }' /tmp/rand1b/prompts.txt | head -n 4)
  python3 -m lowbit.cli generate /tmp/rand1b --device cuda --dtype fp16 -n 256 -p "${P[0]}" 2>&1 | tail -n 2 | tee "$OUTDIR/gen-rand.log"
  python3 -m lowbit.cli generate /tmp/rand1b --device cuda --dtype fp16 -n 256 -p "${P[0]}" -p "${P[1]}" -p "${P[2]}" \
    -p "${P[3]}" 2>&1 | tail -n 2 | tee -a "$OUTDIR/gen-rand.log"
  python3 -m lowbit.cli bench e2e --model /tmp/rand1b --schemes fp16 --batch 1,4 --context 256 --no-transformers 2>&1 \
    | tr '\r' '\n' | grep -v "it/s\]\|s/it\]" | tail -n 8 | tee -a "$OUTDIR/gen-rand.log"
fi
if [ $have_model = yes ] && want recipe-trace; then
  for sch in ${TRACE_SCHEMES:-w4a8 w4a16-2:4}; do
    python3 bench/recipe_trace.py smollm2-135m --scheme $sch --device cuda --samples ${TRACE_SAMPLES:-128} \
      --out "$OUTDIR/trace-${sch/:/}-cuda.pt" 2>&1 | tr '\r' '\n' | grep -v "layer/s\]\|s/layer\]" | tail -n 2
  done
fi
if [ $have_model = yes ] && want recipe-spread; then
  # the same traces with --eval, unperturbed and under $SPREAD_SEEDS perturbations of 1e-7 (noise drawn on
  # the CPU, the same as a CPU run's), $SPREAD_JOBS processes at once (a 135M model leaves the GPU mostly idle):
  # the perplexity spread that rounding alone makes, against the CPU's (issue 21)
  jobs=()
  for sch in ${TRACE_SCHEMES:-w4a8 w4a16-2:4}; do
    jobs+=("$sch 0 0"); for s in ${SPREAD_SEEDS:-1 2 3}; do jobs+=("$sch 1e-7 $s"); done
  done
  n=0
  for job in "${jobs[@]}"; do
    read -r sch pert seed <<< "$job"; tag=${sch/:/}-p$pert-s$seed
    # only the unperturbed traces come back (8 files at most); the others stay for --spread
    dest=/tmp/spread; [ "$pert" = 0 ] && dest=$OUTDIR; mkdir -p /tmp/spread
    python3 bench/recipe_trace.py smollm2-135m --scheme $sch --device cuda --perturb $pert --noise-seed $seed --eval \
      --samples ${TRACE_SAMPLES:-128} --out "$dest/cuda-$tag.pt" > "/tmp/spread-$tag.log" 2>&1 &
    n=$((n + 1)); [ $((n % ${SPREAD_JOBS:-4})) = 0 ] && wait
  done
  wait
  for f in /tmp/spread-*.log; do echo "$f: $(tail -n 1 "$f")"; done
  python3 bench/recipe_trace.py --spread "$OUTDIR"/cuda-*.pt /tmp/spread/cuda-*.pt 2>&1 | tee "$OUTDIR/spread.log"
fi
if want prefill-profile; then
  python3 bench/prefill_profile.py --lengths ${PREFILL_LENGTHS:-64,512,2048} 2>&1 | tee "$OUTDIR/prefill_profile.log"
fi
if want ncu; then
  mkdir -p "$OUTDIR/ncu"
  for cell in ${NCU_CELLS:-w4a16:llama3-8b:gateup:1 w4a16:llama3-8b:gateup:16 w4a16:llama3-8b:gateup:64 w4a16:llama3-8b:gateup:256 w4a16:llama3-8b:gateup:1024}; do
    IFS=: read -r path model layer m <<< "$cell"
    f="$OUTDIR/ncu/${path}_${layer}_${m}.txt"
    # the 5 calls of profile_one.py: skip 2 (compilation, first touch), report the third. The filter names
    # our GEMM kernels ('_kernel$' alone also matched PyTorch's RNG kernel that draws the inputs);
    # NCU_KERNEL widens it, e.g. to '_act_quant|nvjet|xmma|cutlass' for a cuBLAS path and its quantization,
    # with NCU_SKIP / NCU_COUNT for the launches of one call
    timeout 120 ncu --clock-control none -k regex:"${NCU_KERNEL:-^_(w4a16|w4a8|mixed|w8a8|w4a4|w4ax|sparse24)}" \
      --launch-skip ${NCU_SKIP:-2} --launch-count ${NCU_COUNT:-1} \
      --section SpeedOfLight --section WarpStateStats --section Occupancy --section LaunchStats \
      --section MemoryWorkloadAnalysis python3 scripts/profile_one.py "$path" "$model:$layer" "$m" > "$f" 2>&1
    echo "== $cell: $(grep -m1 "$path" "$f")"
    grep -E "Context [0-9]+, Stream|^ +(Duration|DRAM Throughput|Compute \(SM\) Throughput|Achieved Occupancy|Registers Per Thread|Warp Cycles Per Issued Instruction|Grid Size|Block Limit Registers) " "$f" \
      | sed 's/  */ /g' | tee -a "$OUTDIR/ncu.log"
  done
fi
if want prefill; then
  for L in 512 2048 4096; do
    python3 -m lowbit.cli bench e2e --schemes fp16 --batch 1,16 --context $L --prompt-len $L --steps 4 2>&1 \
      | tr '\r' '\n' | grep -v "it/s\]\|s/it\]" | tail -n 8 | tee -a "$OUTDIR/prefill.log"
  done
fi
if want eval-15b; then
  # the 1.5B model: carried in parts (scripts/split_asset.sh), assembled and checked here
  q15=$LOWBIT_CACHE/assets/qwen2.5-coder-1.5b/qwen2.5-coder-1.5b-instruct-q4_k_m.gguf
  if assemble qwen15b "$q15"; then
    schemes=${EVAL15_SCHEMES:-w4a16,w4a16-rtn,w8a8-fp8,w8a8-int8,w4a8,w4a8-g128,w4a4-quik,w4a4,w4a4kv4-comet,w4a16-2:4,w4a8+kv8,w4a8+kv4}
    python3 -m lowbit.cli eval qwen2.5-coder-1.5b --device cuda --dtype fp32 --schemes "$schemes" ${EVAL15_ARGS:-} \
      --json "$OUTDIR/${EVAL15_JSON:-eval15}.json" 2>&1 | tr '\r' '\n' | grep -v "it/s\]\|s/it\]\|chunk/s\|layer/s\]" \
      | tee "$OUTDIR/eval15.log"
  fi
fi
if want gptq-speed; then
  # calibration time on random-weight models of real shapes, one layer on the GPU at a time ($GPTQ_ARGS);
  # GPTQ_OLD=DIR also times the implementation in DIR (a copy of an older lowbit/) with $GPTQ_OLD_ARGS
  python3 bench/gptq_speed.py ${GPTQ_ARGS:-} --json "$OUTDIR/gptq_speed.json" 2>&1 | tr '\r' '\n' \
    | grep -v "it/s\]\|s/it\]\|layer/s\]" | tee -a "$OUTDIR/gptq_speed.log"
  if [ -n "${GPTQ_OLD:-}" ]; then
    PYTHONPATH="$GPTQ_OLD:${PYTHONPATH:-}" python3 bench/gptq_speed.py ${GPTQ_OLD_ARGS:-} --json "$OUTDIR/gptq_speed_old.json" 2>&1 \
      | tr '\r' '\n' | grep -v "it/s\]\|s/it\]\|layer/s\]" | tee -a "$OUTDIR/gptq_speed.log"
  fi
fi
if want bench; then
  python3 -m lowbit.cli bench kernels ${BENCH_ARGS:-} --json "$OUTDIR/kernels.json" 2>&1 | tee "$OUTDIR/bench.log"
fi

e2e="skipped"
if [ $have_model = yes ] && want e2e; then
  # quantize the default model, then generate with its layers on the Triton kernels (fp16 and bf16)
  for scheme in w4a16 w4a8 w8a8-fp8; do
    python3 -m lowbit.cli quantize smollm2-135m --scheme $scheme --device cuda --samples 32 \
      -o /tmp/q-$scheme --overwrite 2>&1 | tr '\r' '\n' | grep -v "it/s\]\|s/it\]" | tail -n 2
    python3 -m lowbit.cli generate /tmp/q-$scheme --device cuda --dtype fp16 -n 48 \
      -p "Explain in two sentences why quantizing an LLM to 4 bits makes it faster to serve." 2>&1 | tee -a "$OUTDIR/e2e.log"
  done
  e2e=$(grep -c "quantized layers on GPU kernels" "$OUTDIR/e2e.log")" of 3 schemes generated on kernels"
fi

if [ $have_model = yes ] && want ablate; then
  python3 bench/ablate_accuracy.py --device cuda --dtype fp32 --json "$OUTDIR/ablation.json" 2>&1 \
    | tr '\r' '\n' | grep -v "it/s\]\|s/it\]\|chunk/s" | tee "$OUTDIR/ablation.log"
fi
echo
echo "| check | result |"
echo "|---|---|"
echo "| GPU | $(nvidia-smi --query-gpu=name --format=csv,noheader | head -n 1) |"
echo "| GPU tests (tests/test_gpu.py) | $tests |"
echo "| lowbit generate smollm2-135m --device cuda (bf16) | $gen |"
echo "| kernel tests (tests/test_kernels.py, test_kernel_ops.py) | $kern |"
echo "| engine tests (attention kernel, scheduler, graphs, e2e bench) | $eng |"
echo "| CUTLASS kernel tests (tests/test_cutlass_w4a16.py, test_cutlass_w4a8.py) | $cut |"
echo "| quantize + generate on kernels (e2e) | $e2e |"
