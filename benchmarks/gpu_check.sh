#!/usr/bin/env bash
# One-shot check of dali-relabel on a GPU machine, run from the repository root (benchmarks/README.md).
# Steps, in this order, each capped by what is left of --budget-s (which covers all of them):
#   1. stage       install the staged DALI wheels (STAGE/part-*, MANIFEST, made by pack_dali_wheels.sh)
#                  into TARGET with STAGE/install_dali_wheels.sh (or the same steps built in here),
#                  drop the wheels' stray nvidia/__init__.py, put TARGET on PYTHONPATH
#   2. preflight   versions of what the project needs, the GPU, nvcc
#   3. install     pip install --no-deps --no-build-isolation -e .  (+ install-check: import it elsewhere)
#   4. plugin      load it from $DALI_RELABEL_PLUGIN_DIR if that fits, else build it (for this GPU only)
#   5. gpu-tests   python -m pytest -m gpu TESTS
#   6. operator    python -m benchmarks.operator --devices all --batch-sizes 256
#   7. throughput  python -m benchmarks.throughput --device gpu --contenders plain,relabel,feed --batch-sizes 256
#   8. tests       python -m pytest -m "not gpu" TESTS, with whatever time is left
# Statuses: ok, failed, skipped, "not reached" (the budget ran out before or during the step: not a
# failure). Every step runs even if an earlier one failed, except: nothing runs without DALI, and on a
# GPU machine nothing runs after a failed preflight.
# Logs and results go to a work folder (--work); the output folder gets at most 8 files:
#   summary.json     every step's status, seconds and detail, the key figures (operator speedups,
#                    images/s and ratios, feed samples/s), the tests' counts and failing names
#   results.tar.gz   the work folder's results/ (JSON, PNG, markdown, junit) and logs/
#   tail-STEP.log    the end of each failed step's log (at most 6)
# summary.json is rewritten after every step, so a check killed outright still leaves one.
# Exit status: 0 if no step failed, 1 if one did, 2: bad usage.
#
# --dry-run: the same steps on this CPU machine, skipping only the GPU parts: no staging (DALI must be
#   importable), pip installs into a throw-away venv (python3's own install is left alone), the
#   operator and throughput suites run on the CPU, GPU tests skip themselves.
# --tiny: tiny benchmark settings (for testing this script); --tests "ARGS" replaces the pytest
#   arguments of both test steps (default: tests).
# The commit recorded is $DALI_RELABEL_GIT_COMMIT, else git's, else "unknown" (a copy without .git).
set -uo pipefail

usage() {
  sed -n '2,/^set -uo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'
  cat <<'EOF'
Usage: benchmarks/gpu_check.sh [--dry-run] [--tiny] [--out DIR] [--work DIR] [--stage DIR] [--target DIR]
                               [--data-dir DIR] [--threads N] [--budget-s S] [--tests "PYTEST ARGS"]
  --out DIR       what goes back (default: $OUT, else ./gpu-check-out)
  --work DIR      logs and results (default: a new folder under ${TMPDIR:-/tmp})
  --stage DIR     staged DALI wheels (default: /tmp/stage)
  --target DIR    where the wheels are installed (default: /tmp/dali-site)
  --data-dir DIR  generated benchmark images (default: /tmp/dali-relabel-bench-data)
  --threads N     DALI CPU threads of the throughput loaders (default: 8)
  --budget-s S    seconds the whole check may take, DALI's install included (default: 300;
                  540 is the most that fits one 600 s command with a minute to spare)
EOF
}

begin=$(date +%s)
dry_run=0; tiny=0; threads=8; budget=300
out=${OUT:-$PWD/gpu-check-out}; work=""; stage=/tmp/stage; target=/tmp/dali-site; data=/tmp/dali-relabel-bench-data
tests="tests"
while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run) dry_run=1 ;;
    --tiny) tiny=1 ;;
    --out) out=${2:?--out needs a folder}; shift ;;
    --work) work=${2:?--work needs a folder}; shift ;;
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

mkdir -p "$out" || exit 2
out=$(cd "$out" && pwd)
[ -n "$work" ] || work=$(mktemp -d "${TMPDIR:-/tmp}/gpu-check.XXXXXX") || exit 2
mkdir -p "$work/logs" "$work/results" || exit 2
work=$(cd "$work" && pwd)
rm -f "$out/summary.json" "$out/results.tar.gz" "$out"/tail-*.log  # this script's files of an earlier run
: > "$work/steps.tsv"
all_steps="stage preflight install install-check plugin gpu-tests operator throughput tests"
reserve=25   # seconds kept for the summary and the archive, and timeout's grace before SIGKILL
min_step=10  # a step with less time than this left is not started
failed=0
export PYTHONUNBUFFERED=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_BREAK_SYSTEM_PACKAGES=1
export DALI_RELABEL_GPU_CHECK=1  # tests/test_benchmarks.py does not run this script again inside it
if [ "$dry_run" = 1 ]; then device=cpu; mode="dry run (CPU)"; else device=gpu; mode=gpu; fi
commit=${DALI_RELABEL_GIT_COMMIT:-$(git rev-parse HEAD 2>/dev/null)}
if [ -n "$commit" ]; then export DALI_RELABEL_GIT_COMMIT=$commit; else commit=unknown; fi

elapsed() { echo $(( $(date +%s) - begin )); }
left() { echo $(( budget - $(elapsed) - reserve )); }

summarize() {  # summary.json now (add --final for the archive, the log tails and the printed brief)
  python3 -m benchmarks.gpu_summary "$work" "$out" --mode "$mode" --budget "$budget" --seconds "$(elapsed)" \
    --commit "$commit" "$@"
}

# record NAME STATUS SECONDS DETAIL: one line of steps.tsv, and summary.json rewritten.
record() {
  printf '%s\t%s\t%s\t%s\n' "$1" "$2" "$3" "$4" >> "$work/steps.tsv"
  summarize > /dev/null 2>> "$work/logs/summary.log" || echo "gpu_check.sh: summary.json not written (logs/summary.log)"
}
recorded() { grep -q "^$1	" "$work/steps.tsv"; }
skip() { record "$1" skipped 0 "$2"; echo "== $1: skipped ($2)"; }
skip_rest() { local s; for s in $all_steps; do recorded "$s" || skip "$s" "$1"; done; }

# step NAME MAX_S COMMAND...: run it with at most MAX_S seconds, or what is left of the budget if that
# is less (then a timeout is "not reached", not a failure); log to logs/NAME.log.
# Returns the command's status, 3 when the step was not started.
step() {
  local name=$1 max=$2; shift 2
  local room limit capped=0 t0 rc took status detail
  room=$(left)
  if [ "$room" -lt "$min_step" ]; then
    record "$name" "not reached" 0 "no time left of the ${budget} s budget"
    echo "== $name: not reached (no time left of the ${budget} s budget)"
    return 3
  fi
  limit=$max
  if [ "$room" -lt "$max" ]; then limit=$room; capped=1; fi
  t0=$(date +%s)
  echo "== $name (limit ${limit} s, at $(elapsed) s) $*" | tee -a "$work/logs/$name.log"
  timeout -s INT -k 10 "$limit" "$@" >> "$work/logs/$name.log" 2>&1
  rc=$?
  took=$(( $(date +%s) - t0 ))
  if [ "$rc" = 0 ]; then
    status=ok; detail=""
  elif [ "$rc" = 5 ] && [ "${name%tests}" != "$name" ]; then  # pytest's "no tests ran"
    status=skipped; detail="pytest selected no tests"
  elif { [ "$rc" = 124 ] || [ "$rc" = 137 ]; } && [ "$took" -ge "$limit" ]; then
    if [ "$capped" = 1 ]; then
      status="not reached"; detail="cut by the ${budget} s budget after ${took} s"
    else
      status=failed; detail="timeout: over its ${max} s limit"; failed=1
    fi
  else
    status=failed; detail="exit status $rc"; failed=1
  fi
  record "$name" "$status" "$took" "$detail"
  echo "   $name: $status${detail:+ ($detail)} in $took s"
  [ "$status" = failed ] && tail -n 15 "$work/logs/$name.log" | sed 's/^/   | /'
  return "$rc"
}

# What install_dali_wheels.sh does (join the parts, check them against MANIFEST, pip install --target),
# for a stage folder without that script. Runs in its own bash (see the stage step).
install_staged() {
  set -euo pipefail
  local stage=$1 target=$2
  cat "$stage"/part-* > "$stage/wheels.tar"
  echo "$(cat "$stage/MANIFEST")  $stage/wheels.tar" | sha256sum -c -
  tar -C "$stage" -xf "$stage/wheels.tar"
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$target" \
    "$stage"/wheels/*.whl
}

finish() {
  local rc=$?
  trap - EXIT
  rm -rf "$work/venv"
  summarize --final || { echo "gpu_check.sh: no summary (logs/summary.log)"; rc=1; }
  echo "gpu_check.sh: logs and results in $work; summary.json and results.tar.gz in $out"
  exit "$rc"
}
trap finish EXIT
trap 'exit 130' INT TERM

echo "gpu_check.sh: $mode, out $out, work $work, budget $budget s, commit $commit"

# 1. DALI from the staged wheels
if [ "$dry_run" = 1 ]; then
  skip stage "dry run: DALI as installed"
elif PYTHONPATH="$target${PYTHONPATH:+:$PYTHONPATH}" python3 -c "import nvidia.dali" 2>/dev/null; then
  skip stage "DALI already importable (from $target or python3's own packages)"
elif [ ! -f "$stage/MANIFEST" ] || ! ls "$stage"/part-* > /dev/null 2>&1; then
  { echo "no MANIFEST or part-* in $stage:"; ls -la "$stage"; } >> "$work/logs/stage.log" 2>&1
  record stage failed 0 "no MANIFEST or parts in $stage (did the earlier runs copy them, on this machine?)"
  failed=1
else
  ls -la "$stage" >> "$work/logs/stage.log" 2>&1
  if [ -f "$stage/install_dali_wheels.sh" ]; then  # pack_dali_wheels.sh puts it next to the parts
    step stage 150 bash "$stage/install_dali_wheels.sh" "$stage" "$target"
  else
    step stage 150 bash -c "$(declare -f install_staged); install_staged \"\$@\"" install_staged "$stage" "$target"
  fi
  # The nvimgcodec/nvjpeg2k wheels ship nvidia/__init__.py, which would make TARGET/nvidia a regular
  # package that hides the machine's other nvidia.* packages; without it nvidia is a namespace package.
  rm -f "$target/nvidia/__init__.py"
fi
[ "$dry_run" = 1 ] || export PYTHONPATH="$target${PYTHONPATH:+:$PYTHONPATH}"
if ! python3 -c "import nvidia.dali as d; print('DALI', d.__version__, d.__file__)" >> "$work/logs/stage.log" 2>&1; then
  echo "gpu_check.sh: DALI is not importable (logs/stage.log); nothing else can run" | tee -a "$work/logs/stage.log"
  grep -q "^stage	failed" "$work/steps.tsv" || record stage failed 0 "DALI is not importable (logs/stage.log)"
  failed=1; skip_rest "DALI is not importable"; exit 1
fi

# 2. what is there
step preflight 60 python3 - "$work/results/preflight.json" "$device" <<'EOF'
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
info.update(cuda_available=False, gpu=None, capability=None, torch_cuda=None)
if "torch" not in info["missing"]:
    import torch
    info.update(cuda_available=torch.cuda.is_available(), torch_cuda=torch.version.cuda)
    if info["cuda_available"]:
        info.update(gpu=torch.cuda.get_device_name(0), capability="%d%d" % torch.cuda.get_device_capability(0))
for tool, args in (("nvidia-smi", ["-L"]), ("nvcc", ["--version"])):
    exe = shutil.which(tool)
    info[tool] = subprocess.run([exe] + args, capture_output=True, text=True).stdout.strip()[-300:] if exe else None
json.dump(info, open(path, "w"), indent=2)
print(json.dumps(info, indent=2))
problems = info["missing"] + (["no CUDA GPU visible to torch"] if device == "gpu" and not info["cuda_available"] else [])
sys.exit("missing: " + ", ".join(problems) if problems else 0)
EOF
if [ "$?" != 0 ] && [ "$dry_run" = 0 ]; then
  echo "gpu_check.sh: preflight did not pass (logs/preflight.log): not installing anything on this machine"
  skip_rest "the preflight did not pass"; exit 1
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
step install 120 env DALI_RELABEL_SKIP_PLUGIN_BUILD=1 "$python" -m pip install --no-deps --no-build-isolation \
  --no-index -e .
case $? in
  0|3) step install-check 60 bash -c 'cd / && "$0" -c "import dali_relabel, dali_relabel.pipelines.graphs as g; print(dali_relabel.__file__, g.__file__)"' "$python" ;;
  *) skip install-check "the install failed" ;;
esac

# 4. the plugin: loaded from DALI_RELABEL_PLUGIN_DIR when it fits, else built (or found in the cache);
#    on a GPU machine its CUDA backend is built for that GPU alone unless DALI_RELABEL_CUDA_ARCHS says more
if [ "$dry_run" = 0 ] && [ -z "${DALI_RELABEL_CUDA_ARCHS:-}" ]; then
  capability=$(python3 -c 'import json, sys; print(json.load(open(sys.argv[1])).get("capability") or "")' \
    "$work/results/preflight.json" 2>/dev/null)
  [ -n "$capability" ] && export DALI_RELABEL_CUDA_ARCHS=$capability
fi
step plugin 240 "$python" - "$work/results/plugin.json" "$device" <<'EOF'
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

pytest_args=(-q -p no:cacheprovider -p no:randomly -rfE --durations=10)
# 5. the GPU tests first (on the CPU they skip themselves)
# shellcheck disable=SC2086  # $tests is a list of pytest arguments
step gpu-tests 180 "$python" -m pytest "${pytest_args[@]}" -m gpu --junitxml="$work/results/junit-gpu.xml" $tests

# 6, 7. the benchmarks at batch 256 (generated images stay out of the work folder)
if [ "$tiny" = 1 ]; then
  op_args=(--batch-sizes 8 --repeats 1 --target-seconds 0.02)
  tp_args=(--images 24 --classes 5 --batch-sizes 8 --image-size 32 --repeats 1 --batches 2 --warmup 1
           --feed-batches 2 --compare-workers "" --gen-workers 2)
else
  op_args=(--batch-sizes 256 --repeats 5)
  tp_args=(--batch-sizes 256 --repeats 5 --batches 40 --warmup 16 --gen-workers 8)
fi
if [ "$dry_run" = 1 ]; then op_devices=cpu; else op_devices=all; fi
step operator 90 "$python" -m benchmarks.operator --devices "$op_devices" --out-dir "$work/results" "${op_args[@]}"
step throughput 180 "$python" -m benchmarks.throughput --device "$device" --contenders plain,relabel,feed \
  --threads "$threads" --data-dir "$data" --out-dir "$work/results" "${tp_args[@]}"

# 8. the rest of the test suite with the time that is left (SIGINT at the limit: pytest still writes
#    its junit file, and the step is "not reached")
# shellcheck disable=SC2086
step tests "$budget" "$python" -m pytest "${pytest_args[@]}" -m "not gpu" \
  --junitxml="$work/results/junit.xml" $tests
exit "$failed"
