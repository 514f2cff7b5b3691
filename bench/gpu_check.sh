#!/usr/bin/env bash
# The nvidia-cuda target on a real NVIDIA GPU: build the embedded tiny-phi3 (int4 and fp16) with
# `-e cuda`, validate each bundle on the GPU and print the figures. Run from a copy of the repo's
# working tree on the GPU machine (Linux x86_64, python3 >= 3.10, pip reaching the package index):
#
#   bash bench/gpu_check.sh            # figures, and reports under $OUT (default /tmp/phikit-gpu)
#
# It makes its own venv (GPU_VENV, default /tmp/phikit-gpu-venv) with the CUDA builds of the
# runtime that targets/nvidia-cuda.yaml locks (onnxruntime-genai-cuda + onnxruntime-gpu; never
# the CPU onnxruntime / onnxruntime-genai, which install the same modules). The CUDA 13 libraries
# those need (cudart, cuBLAS, cuRAND, cuFFT, cuDNN 9) are taken from the machine (ldconfig,
# /usr/local/cuda*, NVIDIA wheels already in a site-packages) or installed as onnxruntime-gpu's
# [cuda,cudnn] wheels. A python3 that already imports torch is reused for the reference
# (--system-site-packages); otherwise torch==2.13.0 is installed, as the Makefile does.
# Exit 0 only when every bundle passed parity with the figures measured on the CUDA provider.
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$PWD
PY=${PYTHON:-python3}
VENV=${GPU_VENV:-/tmp/phikit-gpu-venv}
OUT=${OUT:-/tmp/phikit-gpu}
PRECISIONS=${PRECISIONS:-int4 fp16}
# set GPU_CHECK_ALLOW_CPU=1 to rehearse on a machine without a GPU (figures then come from the
# CPU execution provider, as the report says)
ALLOW_CPU=${GPU_CHECK_ALLOW_CPU:-0}
mkdir -p "$OUT"

T0=$SECONDS
step() { printf '\n== [%4ds] %s\n' "$((SECONDS - T0))" "$*"; }

step "GPU"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader \
  || echo "nvidia-smi not found or no GPU"

# The runtime pins, read from the target file (one source of truth): e.g.
#   onnx: [onnxruntime-genai-cuda==0.18.0, onnxruntime-gpu==1.31.1]
RUNTIME=$(sed -n 's/^ *onnx: *\[\(.*\)\].*/\1/p' targets/nvidia-cuda.yaml | tr -d ' ' | tr ',' ' ')
ORT_GPU=$(tr ' ' '\n' <<<"$RUNTIME" | grep '^onnxruntime-gpu==')
[ -n "$RUNTIME" ] && [ -n "$ORT_GPU" ] || { echo "cannot read runtime packages from targets/nvidia-cuda.yaml" >&2; exit 2; }

step "venv $VENV (runtime: $RUNTIME)"
SYSTEM_SITE=()
if "$PY" -c "import torch" 2>/dev/null; then
  SYSTEM_SITE=(--system-site-packages)
  echo "reusing $("$PY" -c 'import torch; print("torch", torch.__version__)') from $PY"
fi
[ -x "$VENV/bin/python" ] || "$PY" -m venv "${SYSTEM_SITE[@]}" "$VENV"
PIP=("$VENV/bin/python" -m pip --disable-pip-version-check)
"$VENV/bin/python" -c "import torch" 2>/dev/null || "${PIP[@]}" install -q torch==2.13.0
# phikit's ONNX path only (see requirements.txt), pinned by toolkit/data/constraints.txt; the CUDA runtime as
# the target locks it. pip's constraints leave onnxruntime-gpu / -genai-cuda to the target's pins.
"${PIP[@]}" install -q -c toolkit/data/constraints.txt transformers safetensors sentencepiece typer rich \
  pydantic pyyaml numpy onnx onnx-ir onnxscript $RUNTIME
"${PIP[@]}" install -q --no-deps -e .
if "$VENV/bin/python" -c "import onnxruntime_genai as og; assert og.__id__ == 'onnxruntime-genai-cuda'"; then
  :
else
  echo "onnxruntime_genai in $VENV is not the CUDA build (a CPU onnxruntime-genai shadows it)" >&2
  exit 2
fi

# Directories holding the CUDA 13 libraries; LD_LIBRARY_PATH must be set before python starts
# (ORT's CUDA provider and ORT GenAI's CUDA library have no RUNPATH to NVIDIA's wheels).
cuda_dirs() {
  "$VENV/bin/python" - <<'EOF'
import glob, os, site, subprocess, sys
need = ["libcudart.so.13", "libcublas.so.13", "libcublasLt.so.13", "libcurand.so.10",
        "libcufft.so.12", "libcudnn.so.9"]
roots = [*site.getsitepackages(), *sys.path, *glob.glob("/usr/local/cuda*/lib64"),
         *glob.glob("/usr/local/cuda*/targets/x86_64-linux/lib")]
try:
    ldconfig = subprocess.run(["ldconfig", "-p"], capture_output=True, text=True).stdout
except OSError:
    ldconfig = ""
dirs, missing = [], []
for lib in need:
    if lib in ldconfig:
        continue
    hits = [p for r in roots if os.path.isdir(r)
            for p in glob.glob(os.path.join(r, "**", lib), recursive=True)]
    if hits:
        d = os.path.dirname(hits[0])
        dirs.append(d) if d not in dirs else None
    else:
        missing.append(lib)
print(":".join(dirs))
print(" ".join(missing))
EOF
}
step "CUDA 13 libraries"
{ read -r LIBDIRS; read -r MISSING || true; } < <(cuda_dirs)
if [ -n "${MISSING:-}" ] && [ "$ALLOW_CPU" != 1 ]; then  # a CPU rehearsal needs none
  echo "missing: $MISSING -> installing ${ORT_GPU/==/[cuda,cudnn]==}"
  "${PIP[@]}" install -q -c toolkit/data/constraints.txt "${ORT_GPU/==/[cuda,cudnn]==}"
  { read -r LIBDIRS; read -r MISSING || true; } < <(cuda_dirs)
fi
echo "library dirs: ${LIBDIRS:-(system)}; still missing: ${MISSING:-none}"
export LD_LIBRARY_PATH="${LIBDIRS}${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
export PATH="$VENV/bin:$PATH"

status=0
for precision in $PRECISIONS; do
  bundle="$OUT/tiny-phi3-$precision-nvidia-cuda"
  step "build $precision"
  # exit 1 = built but parity failed (bundle written as .failed): still print what we have
  phikit build "recipes/tiny-phi3-$precision.yaml" --target nvidia-cuda --out "$bundle" \
    > "$OUT/build-$precision.log" 2>&1 || { rc=$?; status=1; tail -20 "$OUT/build-$precision.log";
                                          [ "$rc" = 1 ] || continue; bundle="$bundle.failed"; }
  step "validate $precision"
  phikit validate "$bundle" --json "$OUT/report-$precision.json" \
    > "$OUT/validate-$precision.log" 2>&1 || { status=1; tail -20 "$OUT/validate-$precision.log"; }
  [ -f "$OUT/report-$precision.json" ] || continue
  "$VENV/bin/python" - "$OUT/report-$precision.json" "$precision" "$ALLOW_CPU" <<'EOF' || status=1
import json, sys
r = json.load(open(sys.argv[1])); m, c = r["metrics"], r["candidate"]
print(f"{sys.argv[2]}: verdict {r['verdict'].upper()} | provider {c.get('execution_provider')} "
      f"(requested {c.get('requested_execution_provider')}) | KLD mean {m['kld_mean']:.4g} "
      f"p99 {m['kld_p99']:.4g} | top-1 {m['top1']:.4f} | ppl {m['ppl_reference']:.2f} -> "
      f"{m['ppl_candidate']:.2f} | greedy match {m['greedy_match_mean']:.1f} | candidate "
      f"{r['timing']['candidate_seconds']} s")
for note in r.get("notes", []):
    print("  note:", note)
on_gpu = c.get("execution_provider") == "cuda"
if not on_gpu:
    print("  NOT measured on the GPU" + (" (allowed: GPU_CHECK_ALLOW_CPU=1)" if sys.argv[3] == "1"
                                          else ""))
sys.exit(0 if r["verdict"] == "pass" and (on_gpu or sys.argv[3] == "1") else 1)
EOF
done
step "done (exit $status); logs and reports in $OUT"
exit $status
