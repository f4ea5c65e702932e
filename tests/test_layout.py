"""The README's "Layout" section and the tree say the same thing."""
import os
import re

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = os.path.join(ROOT, "dali_relabel")


def _layout_section() -> str:
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
        text = f.read()
    start = text.index("## Layout\n")
    return text[start:text.index("\n## ", start + 1)]


def _named_in_layout():
    """{folder relative to the root: names mentioned under it} from the section's bullets."""
    named, folder = {}, None
    for line in _layout_section().splitlines():
        if line.startswith("- "):  # a top-level bullet: its folder, or the root
            top = re.match(r"- `([\w/]+/)`", line)
            folder = top.group(1).rstrip("/") if top else "."
        if folder:
            for name in re.findall(r"`([\w./+]+)`", line):
                named.setdefault(folder, set()).add(name.rstrip("/"))
    return named


def test_every_module_of_the_package_is_in_the_layout_section():
    named = _named_in_layout()
    missing = []
    for dirpath, dirnames, filenames in os.walk(PACKAGE):
        dirnames[:] = [d for d in dirnames if not d.startswith(("_", "."))]
        folder = os.path.relpath(dirpath, ROOT)
        if os.path.basename(folder) in ("csrc", "store"):
            continue  # named as folders
        for name in filenames:
            if name.endswith(".py") and name != "__init__.py" and name not in named.get(folder, set()):
                missing.append(os.path.join(folder, name))
    assert not missing, f"modules missing from README.md's Layout section: {missing}"


def test_every_file_the_layout_section_names_exists():
    gone = []
    for folder, names in _named_in_layout().items():
        for name in names:
            if name.endswith(".py") or name.endswith(("csrc", "store", "results")):
                candidates = [os.path.normpath(os.path.join(ROOT, folder, name))]
                candidates += [os.path.join(ROOT, folder, sub, name) for sub in ("store",)]
                if not any(os.path.exists(c) for c in candidates):
                    gone.append(os.path.join(folder, name))
    assert not gone, f"README.md's Layout section names files that do not exist: {gone}"
