#!/usr/bin/env bash
# One-shot check of dali-relabel on a GPU machine, run from the repository root (benchmarks/README.md):
#   1. stage       install the staged DALI wheels (STAGE/part-*, MANIFEST, install_dali_wheels.sh, made by
#                  pack_dali_wheels.sh) into TARGET and put TARGET on PYTHONPATH
#   2. preflight   versions of what the project needs, the GPU, nvcc (results/preflight.json)
#   3. install     pip install --no-deps --no-build-isolation -e .   (the plugin is not built by pip)
#   4. plugin      load it from $DALI_RELABEL_PLUGIN_DIR if that fits, else build it; says which
#   5. operator    python -m benchmarks.operator --devices all
#   6. throughput  python -m benchmarks.throughput --device gpu --contenders plain,relabel,feed --batch-sizes 256
#   7. tests       the whole test suite (python -m pytest tests), with whatever time is left of --budget-s
# Every step runs even if an earlier one failed (except: nothing runs without DALI); each writes
# OUT/logs/<step>.log; results go to OUT/results/ (JSON, PNG, markdown, junit.xml); OUT/summary.json
# lists every step's status and seconds. Exit status: 0 if every step passed, else 1 (2: bad usage).
#
# --dry-run: the same steps on this CPU machine, skipping only the GPU parts: no staging (DALI must be
#   importable), pip installs into a throw-away venv (python3's own install is left alone), the
#   operator and throughput suites run on the CPU, GPU tests skip themselves.
# --tiny: tiny benchmark settings (for testing this script); --tests "ARGS" replaces the pytest arguments.
set -uo pipefail

usage() {
  sed -n '2,/^set -uo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'
  cat <<'EOF'
Usage: benchmarks/gpu_check.sh [--dry-run] [--tiny] [--out DIR] [--stage DIR] [--target DIR]
                               [--data-dir DIR] [--threads N] [--budget-s S] [--tests "PYTEST ARGS"]
  --out DIR       where logs and results go (default: $OUT, else ./gpu-check-out)
  --stage DIR     staged DALI wheels (default: /tmp/stage)
  --target DIR    where the wheels are installed (default: /tmp/dali-site)
  --data-dir DIR  generated benchmark images (default: /tmp/dali-relabel-bench-data; kept out of OUT)
  --threads N     DALI CPU threads of the throughput loaders (default: 8)
  --budget-s S    seconds the whole check may take; the test suite gets what is left (default: 540)
EOF
}

dry_run=0; tiny=0; threads=8; budget=540
out=${OUT:-$PWD/gpu-check-out}; stage=/tmp/stage; target=/tmp/dali-site; data=/tmp/dali-relabel-bench-data
tests="tests"
while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run) dry_run=1 ;;
    --tiny) tiny=1 ;;
    --out) out=${2:?--out needs a folder}; shift ;;
    --stage) stage=${2:?--stage needs a folder}; shift ;;
    --target) target=${2:?--target needs a folder}; shift ;;
    --data-dir) data=${2:?--data-dir needs a folder}; shift ;;
    --threads) threads=${2:?--threads needs a number}; shift ;;
    --budget-s) budget=${2:?--budget-s needs seconds}; shift ;;
    --tests) tests=${2?--tests needs pytest arguments}; shift ;;
    -h|--help) usage; exit 0 ;;
    *) echo "gpu_check.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
  shift
done
case "$threads$budget" in *[!0-9]*) echo "gpu_check.sh: --threads and --budget-s take whole numbers" >&2; exit 2 ;; esac
[ -f setup.py ] && [ -d benchmarks ] || { echo "gpu_check.sh: run it from the repository root" >&2; exit 2; }

mkdir -p "$out/logs" "$out/results" || exit 2
out=$(cd "$out" && pwd)
work=$(mktemp -d "${TMPDIR:-/tmp}/gpu-check.XXXXXX")
steps="$out/logs/steps.tsv"
: > "$steps"
begin=$(date +%s)
failed=0
export PYTHONUNBUFFERED=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_BREAK_SYSTEM_PACKAGES=1
export DALI_RELABEL_GPU_CHECK=1  # tests/test_benchmarks.py does not run this script again inside it
if [ "$dry_run" = 1 ]; then device=cpu; op_devices=cpu; mode="dry run (CPU)"; else device=gpu; op_devices=all; mode=gpu; fi

elapsed() { echo $(( $(date +%s) - begin )); }

# step NAME TIMEOUT_S COMMAND...: run, log to logs/NAME.log, record "NAME<TAB>status<TAB>seconds".
step() {
  local name=$1 limit=$2; shift 2
  local t0 rc status
  t0=$(date +%s)
  echo "== $name (limit ${limit} s, at $(elapsed) s) $*" | tee -a "$out/logs/$name.log"
  timeout -s INT -k 20 "$limit" "$@" >> "$out/logs/$name.log" 2>&1
  rc=$?
  case $rc in 0) status=ok ;; 124|137) status="timeout (${limit} s)"; failed=1 ;; *) status="failed (rc $rc)"; failed=1 ;; esac
  printf '%s\t%s\t%s\n' "$name" "$status" $(( $(date +%s) - t0 )) >> "$steps"
  echo "   $name: $status in $(( $(date +%s) - t0 )) s" ; [ $rc = 0 ] || tail -n 15 "$out/logs/$name.log" | sed 's/^/   | /'
  return $rc
}
skip() { printf '%s\t%s\t0\n' "$1" "skipped ($2)" >> "$steps"; echo "== $1: skipped ($2)"; }

write_summary() {
  python3 - "$steps" "$out/summary.json" "$mode" "$(elapsed)" "$failed" <<'EOF'
import json, sys
steps_file, path, mode, seconds, failed = sys.argv[1:]
steps = []
for line in open(steps_file):
    name, status, took = line.rstrip("\n").split("\t")
    steps.append({"step": name, "status": status, "seconds": int(took)})
json.dump({"mode": mode, "seconds": int(seconds), "ok": failed == "0", "steps": steps}, open(path, "w"), indent=2)
print(json.dumps({"mode": mode, "seconds": int(seconds), "ok": failed == "0",
                  "steps": {s["step"]: s["status"] for s in steps}}))
EOF
}

echo "gpu_check.sh: $mode, out $out, budget $budget s"

# 1. DALI from the staged wheels
if [ "$dry_run" = 1 ]; then
  skip stage "dry run"
elif PYTHONPATH="$target${PYTHONPATH:+:$PYTHONPATH}" python3 -c "import nvidia.dali" 2>/dev/null; then
  skip stage "DALI already installed in $target"
else
  installer="$stage/install_dali_wheels.sh"  # pack_dali_wheels.sh puts a copy next to the parts
  [ -f "$installer" ] || installer=/work/shared/gpu/install_dali_wheels.sh
  step stage 180 bash "$installer" "$stage" "$target"
fi
[ "$dry_run" = 1 ] || export PYTHONPATH="$target${PYTHONPATH:+:$PYTHONPATH}"
if ! python3 -c "import nvidia.dali" >> "$out/logs/stage.log" 2>&1; then
  echo "gpu_check.sh: DALI is not importable (logs/stage.log); nothing else can run" | tee -a "$out/logs/stage.log"
  failed=1; write_summary; exit 1
fi

# 2. what is there
step preflight 60 python3 - "$out/results/preflight.json" "$device" <<'EOF'
import importlib.metadata as md, importlib.util, json, shutil, subprocess, sys
path, device = sys.argv[1:]
# module: distribution (versions come from the metadata: nothing heavy is imported but torch)
need = {"numpy": "numpy", "torch": "torch", "torchvision": "torchvision", "nvidia.dali": None, "h5py": "h5py",
        "PIL": "pillow", "filelock": "filelock", "tqdm": "tqdm", "matplotlib": "matplotlib", "pytest": "pytest",
        "setuptools": "setuptools"}
optional = {"hypothesis": "hypothesis", "wheel": "wheel"}
info = {"python": sys.version.split()[0], "modules": {}, "missing": [], "missing_optional": []}
for name, dist in {**need, **optional}.items():
    if importlib.util.find_spec(name) is None:
        info["missing" if name in need else "missing_optional"].append(name)
        continue
    try:
        info["modules"][name] = md.version(dist) if dist else importlib.import_module(name).__version__
    except Exception:
        info["modules"][name] = "?"
import torch
info["cuda_available"] = torch.cuda.is_available()
info["gpu"] = torch.cuda.get_device_name(0) if info["cuda_available"] else None
info["torch_cuda"] = torch.version.cuda
for tool, args in (("nvidia-smi", ["-L"]), ("nvcc", ["--version"])):
    exe = shutil.which(tool)
    info[tool] = subprocess.run([exe] + args, capture_output=True, text=True).stdout.strip()[-300:] if exe else None
json.dump(info, open(path, "w"), indent=2)
print(json.dumps(info, indent=2))
problems = info["missing"] + (["no CUDA GPU visible to torch"] if device == "gpu" and not info["cuda_available"] else [])
sys.exit("missing: " + ", ".join(problems) if problems else 0)
EOF
if [ "$?" != 0 ] && [ "$dry_run" = 0 ]; then
  echo "gpu_check.sh: preflight failed (logs/preflight.log): not installing anything on this machine"
  write_summary; exit 1
fi

# 3. the project, editable (the plugin is built in step 4, where its time shows). The dry run installs
#    into a throw-away venv that sees exactly the package folders python3 sees (listed in a .pth file;
#    the .pth files in them are not processed, so python3's own install of dali-relabel cannot shadow
#    this checkout). pip never uninstalls outside its own environment, so that install stays as it is
#    (pip install --prefix would remove it). The later steps run in the venv, on this checkout.
python=python3
if [ "$dry_run" = 1 ]; then
  python3 -m venv --without-pip "$work/venv" && python="$work/venv/bin/python"
  python3 -c 'import site; print("\n".join(site.getsitepackages()))' \
    > "$("$python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')/_outer_environment.pth"
fi
step install 180 env DALI_RELABEL_SKIP_PLUGIN_BUILD=1 "$python" -m pip install --no-deps --no-build-isolation \
  --no-index -e . && \
step install-check 60 bash -c 'cd / && "$0" -c "import dali_relabel, dali_relabel.pipelines.graphs as g; print(dali_relabel.__file__, g.__file__)"' "$python"

# 4. the plugin: loaded from DALI_RELABEL_PLUGIN_DIR when it fits, else built (or found in the cache)
step plugin 300 "$python" - "$out/results/plugin.json" "$device" <<'EOF'
import json, os, sys, time
path, device = sys.argv[1:]
start = time.time()
from dali_relabel.ops.plugin import load_plugin
manifest = load_plugin()
seconds = time.time() - start
directory = manifest["directory"]
given = os.environ.get("DALI_RELABEL_PLUGIN_DIR")
made = os.path.getmtime(os.path.join(directory, "manifest.json"))
if given and os.path.realpath(given) == os.path.realpath(directory):
    how = f"loaded from DALI_RELABEL_PLUGIN_DIR={given}"
elif made >= start - 1:
    how = f"built now in {seconds:.0f} s" + (f" (DALI_RELABEL_PLUGIN_DIR={given} did not fit; see above)" if given else "")
else:
    how = f"loaded from an earlier build in {directory}"
report = dict(manifest, how=how, load_seconds=round(seconds, 1))
json.dump(report, open(path, "w"), indent=2)
print(f"plugin: {how}; CUDA backend: {manifest.get('cuda')}; {directory}")
if device == "gpu" and not manifest.get("cuda"):
    sys.exit("the plugin has no CUDA backend (nvcc not found?): the GPU steps cannot run")
EOF

# 5, 6. the benchmarks (generated images stay out of OUT)
if [ "$tiny" = 1 ]; then
  op_args=(--batch-sizes 8 --repeats 1 --target-seconds 0.02)
  tp_args=(--images 24 --classes 5 --batch-sizes 8 --image-size 32 --repeats 1 --batches 2 --warmup 1
           --feed-batches 2 --compare-workers "" --gen-workers 2)
else
  op_args=(--batch-sizes 64,256,1024 --repeats 5)
  tp_args=(--batch-sizes 256 --repeats 5 --batches 40 --warmup 16 --gen-workers 8)
fi
step operator 150 "$python" -m benchmarks.operator --devices "$op_devices" --out-dir "$out/results" "${op_args[@]}"
step throughput 300 "$python" -m benchmarks.throughput --device "$device" --contenders plain,relabel,feed \
  --threads "$threads" --data-dir "$data" --out-dir "$out/results" "${tp_args[@]}"

# 7. the whole test suite with the time that is left
left=$(( budget - $(elapsed) - 15 ))
if [ "$left" -lt 30 ]; then
  skip tests "no time left of the ${budget} s budget"; failed=1
else
  # shellcheck disable=SC2086  # $tests is a list of pytest arguments
  step tests "$left" "$python" -m pytest -q -p no:cacheprovider --junitxml="$out/results/junit.xml" \
    --durations=15 $tests
fi
rm -rf "$work"
write_summary
exit "$failed"
