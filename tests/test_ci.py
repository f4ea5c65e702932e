""".ci/run runs the suite under every DALI flavour README.md documents, installed as README.md says.

* what it installs per flavour is read from the script and compared with README.md (as the Dockerfile
  is in test_dockerfile.py), and it runs README's test command;
* its control flow (each run in its own venv, every run's pytest summary printed, failure if either
  run fails, pytest's exit code 5 a failure, its temporary folder removed) is checked by running it
  with a stand-in Python whose venvs hold a fake pip and a fake pytest: seconds, no network.
"""
from __future__ import annotations

import os
import re
import subprocess

import pytest

from test_dockerfile import _read, dali_flavours, package_installs, readme_installs_by_flavour, setup_extras

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CI = os.path.join(ROOT, ".ci", "run")


def ci_installs(script: str):
    """{flavour: (flags, extras)} from the script's `run FLAVOUR 'pip install ...'` lines."""
    found = {}
    for flavour, install in re.findall(r"^\s*\w+\)\s+run (\w+) '([^']*)'", script, re.M):
        installs = package_installs(install)
        assert len(installs) == 1, f".ci/run: {install!r} is not one pip install of the package"
        found[flavour] = installs[0]
    return found


def readme_test_command(readme: str) -> str:
    """The command after `&&` on the quick start's pytest line."""
    block = re.search(r"```[a-z]*\n(.*?)```", readme, re.S).group(1)
    line = next(line for line in block.splitlines() if "pytest" in line)
    return line.split("&&", 1)[1].split("#", 1)[0].strip()


def test_ci_installs_every_documented_flavour_as_the_readme_says():
    readme, setup_text, script = _read("README.md"), _read("setup.py"), _read(".ci/run")
    documented = readme_installs_by_flavour(readme, setup_text)
    installs = ci_installs(script)
    assert installs == documented
    for flavour, (_, extras) in installs.items():
        assert dali_flavours(extras, setup_extras(setup_text)) == [flavour]
    default = re.search(r"^flavours=\$\{DALI_RELABEL_CI_FLAVOURS:-([^}]*)\}", script, re.M).group(1).split()
    assert sorted(default) == sorted(documented)
    assert readme_test_command(readme) == "python3 -m pytest -q"
    assert f'timeout --kill-after=30 "$suite_timeout" {readme_test_command(readme)})' in script


# ------------------------------------------------------------------------------------------------
# The script's control flow, with a stand-in Python.

FAKE_PYTHON = r"""#!/usr/bin/env bash
# Stand-in for `python3 -m venv DIR`: DIR/bin gets activate, pip and python3 fakes.
[[ $1 == -m && $2 == venv ]] || exit 99
venv=$3
flavour=${venv##*venv-}
mkdir -p "$venv/bin"
echo "export PATH=\"$venv/bin:\$PATH\"" > "$venv/bin/activate"
cat > "$venv/bin/pip" <<EOF
#!/usr/bin/env bash
echo "$flavour: pip \$*" >> "$FAKE_CALLS"
rc_var=FAKE_PIP_RC_$flavour
exit \${!rc_var:-0}
EOF
cat > "$venv/bin/python3" <<EOF
#!/usr/bin/env bash
if [[ \$1 == -c ]]; then
    dali_var=FAKE_DALI_$flavour
    echo "\${!dali_var:-nvidia-dali-$flavour 2.4.0}"
    exit 0
fi
echo "$flavour: python3 \$*" >> "$FAKE_CALLS"
rc_var=FAKE_PYTEST_RC_$flavour
rc=\${!rc_var:-0}
case \$rc in
    0) echo "7 passed, 1 skipped in 0.05s" ;;
    5) echo "no tests ran in 0.01s" ;;
    *) echo "1 failed, 6 passed in 0.05s" ;;
esac
exit \$rc
EOF
chmod +x "$venv/bin/pip" "$venv/bin/python3"
"""


@pytest.fixture
def run_ci(tmp_path):
    fake = tmp_path / "python"
    fake.write_text(FAKE_PYTHON)
    fake.chmod(0o755)
    scratch = tmp_path / "tmp"

    def run(**env):
        scratch.mkdir(exist_ok=True)
        calls = tmp_path / "calls"
        calls.write_text("")
        full = {k: v for k, v in os.environ.items() if not k.startswith("DALI_RELABEL_CI_")}
        full.update(PYTHON=str(fake), TMPDIR=str(scratch), FAKE_CALLS=str(calls), **env)
        done = subprocess.run(["bash", CI], env=full, capture_output=True, text=True, timeout=60)
        assert os.listdir(scratch) == [], "the CI run left its temporary folder behind"
        return done.returncode, done.stdout + done.stderr, calls.read_text().splitlines()

    return run


@pytest.mark.slow
def test_ci_runs_both_flavours_in_fresh_venvs_and_prints_both_summaries(run_ci):
    rc, out, calls = run_ci()
    assert rc == 0, out
    assert calls == ['cuda120: pip install -e .[dev]', 'cuda120: python3 -m pytest -q',
                     'cuda130: pip install -e .[cuda130,test]', 'cuda130: python3 -m pytest -q']
    summary = out.split("=== summary", 1)[1]
    for flavour in ("cuda120", "cuda130"):
        assert re.search(rf"^{flavour}: ok: 7 passed, 1 skipped in 0.05s \[nvidia-dali-{flavour} 2.4.0; "
                         r"install \d+ s, suite \d+ s\]$", summary, re.M), summary


@pytest.mark.slow
@pytest.mark.parametrize("failing", ["cuda120", "cuda130"])
def test_ci_fails_when_either_suite_fails_and_still_runs_and_reports_the_other(run_ci, failing):
    rc, out, calls = run_ci(**{f"FAKE_PYTEST_RC_{failing}": "1"})
    assert rc != 0
    summary = out.split("=== summary", 1)[1]
    assert f"{failing}: FAILED (pytest exit code 1): 1 failed, 6 passed" in summary
    other = "cuda130" if failing == "cuda120" else "cuda120"
    assert f"{other}: ok: 7 passed" in summary


@pytest.mark.slow
def test_ci_treats_no_collected_tests_as_a_failure(run_ci):
    rc, out, _ = run_ci(FAKE_PYTEST_RC_cuda130="5")
    assert rc != 0
    assert "cuda130: FAILED (pytest exit code 5: no tests were collected): no tests ran" in out


@pytest.mark.slow
def test_ci_fails_on_a_failed_install_or_the_wrong_dali(run_ci):
    rc, out, calls = run_ci(FAKE_PIP_RC_cuda120="1")
    assert rc != 0 and "cuda120: FAILED: 'pip install -e \".[dev]\"' failed" in out
    assert "cuda120: python3 -m pytest -q" not in calls and "cuda130: python3 -m pytest -q" in calls
    rc, out, _ = run_ci(FAKE_DALI_cuda130="nvidia-dali-cuda120 2.4.0")
    assert rc != 0 and "gave DALI 'nvidia-dali-cuda120 2.4.0', not nvidia-dali-cuda130" in out


@pytest.mark.slow
def test_ci_can_run_one_flavour(run_ci):
    rc, out, calls = run_ci(DALI_RELABEL_CI_FLAVOURS="cuda130")
    assert rc == 0 and [c.split(":")[0] for c in calls] == ["cuda130", "cuda130"]
    rc, out, _ = run_ci(DALI_RELABEL_CI_FLAVOURS="cuda999")
    assert rc != 0 and "cuda999: FAILED: unknown flavour" in out


@pytest.mark.slow
def test_ci_script_is_valid_bash():
    assert subprocess.run(["bash", "-n", CI], capture_output=True).returncode == 0
    assert os.access(CI, os.X_OK)
