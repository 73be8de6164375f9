"""Colab as a learner meets it, rehearsed on this machine (``make test-colab``; skipped in the other runs).

On Colab the package is what ``pip install "llama3vision-min[colab] @ git+URL"`` builds from a clean clone
(a wheel: package data must be declared to be in it), each notebook runs alone on a fresh machine with no
repository beside it, and Colab's own kernel (ipykernel 5.5.6, IPython 7.34.0) must be left as it is. Here:

1. a fresh virtual environment (``.venv-colab``) holds what a Colab runtime holds before the setup cell:
   torch, Colab's pins of the kernel packages, and a stand-in ``google.colab`` imported at kernel start;
2. the setup cell's requirement is resolved with ``pip install --dry-run --report``: it must replace none of
   the kernel packages. Then the setup cell itself runs in that kernel, its GitHub URL redirected by git's
   ``insteadOf`` to a clean clone of this repository's HEAD (commit first: what is not committed is not on
   GitHub either): pip clones, builds the wheel and installs it, non-editable, as on Colab;
3. the installed wheel holds every file of the package, and the photograph and miniature are readable;
4. every notebook, copied alone into an empty folder, runs top to bottom in that kernel (two at a time): with
   the real backend against the fake Hub (``tests/fake_hub.py``), and with ``auto`` (a CPU runtime: the
   miniature).

What it cannot show: a GPU, the real downloads, Colab's own front end (widgets render there, not here).
"""

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import nbformat
import pytest

from conftest import offline_env

pytestmark = pytest.mark.skipif(os.environ.get("LLAMA3VISION_COLAB_REHEARSAL") != "1",
                                reason="the Colab rehearsal runs in `make test-colab` (it builds a wheel "
                                       "and a Colab-like environment)")

ROOT = Path(__file__).resolve().parents[2]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))
VENV = ROOT / ".venv-colab"
TORCH = os.environ.get("TORCH", "torch==2.13.0")
COLAB_PINS = ["ipykernel==5.5.6", "ipython==7.34.0", "tornado==6.3.3", "notebook==6.5.7", "ipywidgets==7.7.1",
              "matplotlib==3.10.*", "anyio>=4.10"]
"""What a Colab runtime holds before any notebook runs: google-colab's kernel pins as users report them, its
widgets and matplotlib, and anyio 4 (Colab ships httpx); jupyter-client and the rest as these resolve."""
KERNEL_PACKAGES = {"ipykernel", "ipython", "tornado", "jupyter-client", "notebook", "nbval", "nbclient",
                   "pyzmq", "prompt-toolkit", "traitlets", "jupyter-core"}
"""Packages the setup cell must never install or replace (Colab warns that its runtime may crash)."""
GOOGLE_COLAB = ('"""Stand-in for Colab\'s google.colab (tests/repo/test_colab.py): importable, imported at '
                'kernel start."""\n')
SETUP_REQUIREMENT = re.compile(r'f"(llama3vision-min\[[\w,-]+\]) @ git\+\{REPO_URL\}"')

RESULTS = []  # (what, seconds, detail), printed under the test results (conftest.py)


def _run(*command, **kwargs):
    done = subprocess.run([str(part) for part in command], capture_output=True, text=True, **kwargs)
    assert done.returncode == 0, (f"{' '.join(map(str, command))}\n"
                                  f"{done.stdout[-2000:]}\n{done.stderr[-3000:]}")
    return done.stdout


def _setup_cell():
    return nbformat.read(NOTEBOOKS[0], as_version=4).cells[1].source


def _repo_url():
    return re.search(r'REPO_URL = "([^"]+)"', _setup_cell()).group(1)


@pytest.fixture(scope="module")
def colab_python():
    """``.venv-colab``'s python: torch, Colab's kernel pins and a stand-in google.colab, imported at kernel
    start.

    Built once and kept between local runs (CI starts without it); the package is removed before each run.
    """
    python = VENV / "bin" / "python"
    stamp, wanted = VENV / ".colab-base", " ".join([sys.version.split()[0], TORCH, *COLAB_PINS])
    if not (stamp.is_file() and stamp.read_text() == wanted):
        start = time.perf_counter()
        shutil.rmtree(VENV, ignore_errors=True)
        _run(sys.executable, "-m", "venv", VENV)  # based on the interpreter below this venv
        _run(python, "-m", "pip", "install", "--quiet", TORCH)
        _run(python, "-m", "pip", "install", "--quiet", *COLAB_PINS)
        site = Path(_run(python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])").strip())
        (site / "google" / "colab").mkdir(parents=True, exist_ok=True)
        (site / "google" / "colab" / "__init__.py").write_text(GOOGLE_COLAB)
        startup = VENV / "ipython" / "profile_default" / "startup"
        startup.mkdir(parents=True, exist_ok=True)
        (startup / "00-google-colab.py").write_text(
            "import google.colab  # as Colab's kernel does at start\n")
        kernel = VENV / "jupyter" / "kernels" / "colab-stand-in"
        kernel.mkdir(parents=True, exist_ok=True)
        (kernel / "kernel.json").write_text(json.dumps({
            "argv": [str(python), "-m", "ipykernel_launcher", "-f", "{connection_file}"],
            "display_name": "Colab stand-in", "language": "python"}))
        stamp.write_text(wanted)
        RESULTS.append(("Colab-like environment built", time.perf_counter() - start,
                        " ".join(COLAB_PINS[:2])))
    subprocess.run([python, "-m", "pip", "uninstall", "--quiet", "--yes", "llama3vision-min"],
                   capture_output=True)
    return python


@pytest.fixture(scope="module")
def clone(tmp_path_factory):
    """A clean clone of this repository's HEAD (what GitHub would serve)."""
    target = tmp_path_factory.mktemp("github") / "llama3vision-min"
    _run("git", "clone", "--quiet", ROOT, target)
    return target


@pytest.fixture(scope="module")
def github_env(clone):
    """Environment variables that send git's clones of the repository URL to the clean clone."""
    return {"GIT_CONFIG_COUNT": "1", "GIT_CONFIG_KEY_0": f"url.{clone.as_uri()}.insteadOf",
            "GIT_CONFIG_VALUE_0": _repo_url()}


def _kernel_env(fake_hub, backend, home):
    """What the stand-in kernel sees: a fresh machine's HOME and caches, the fake Hub, no checkout on the
    path."""
    env = offline_env(fake_hub, LLAMA3VISION_BACKEND=backend,
                      LLAVA_PRETRAIN=str(Path(fake_hub) / "LLaVA-Pretrain"),
                      IPYTHONDIR=str(VENV / "ipython"), HOME=str(home), XDG_CACHE_HOME=str(home / ".cache"))
    for variable in ("PYTHONPATH", "VIRTUAL_ENV", "MPLBACKEND", "LLAMA3VISION_COLAB_REHEARSAL"):
        env.pop(variable, None)
    return env


def _execute(notebook, folder, env):
    from nbclient import NotebookClient

    os.environ["JUPYTER_PATH"] = str(VENV / "jupyter")  # where the client finds the stand-in kernel
    client = NotebookClient(notebook, timeout=900, kernel_name="colab-stand-in",
                            resources={"metadata": {"path": str(folder)}})
    start = time.perf_counter()
    client.execute(env=env)
    return time.perf_counter() - start


def _site_size(python):
    site = Path(_run(python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])").strip())
    return sum(path.stat().st_size for path in site.rglob("*") if path.is_file())


@pytest.fixture(scope="module")
def installed(colab_python, github_env, fake_hub, tmp_path_factory):
    """The setup cell's requirement resolved with a dry run, then the setup cell run in the stand-in
    kernel."""
    requirement = SETUP_REQUIREMENT.search(_setup_cell()).group(1) + f" @ git+{_repo_url()}"
    report = tmp_path_factory.mktemp("dry-run") / "report.json"
    env = {**os.environ, **github_env}
    _run(colab_python, "-m", "pip", "install", "--quiet", "--dry-run", "--report", report, requirement,
         env=env)
    dry_run = json.loads(report.read_text())

    before, kernel_before = _site_size(colab_python), _kernel_versions(colab_python)
    folder = tmp_path_factory.mktemp("setup")
    notebook = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(_setup_cell())])
    seconds = _execute(notebook, folder, {**_kernel_env(fake_hub, "auto", folder), **github_env})
    megabytes = (_site_size(colab_python) - before) / 1e6
    RESULTS.append(("setup cell (pip install from the clone)", seconds, f"{megabytes:.0f} MB installed"))
    return {"dry_run": dry_run, "setup_output": notebook.cells[0].outputs,
            "kernel_before": kernel_before, "kernel_after": _kernel_versions(colab_python)}


def test_the_setup_cell_replaces_none_of_colabs_kernel_packages(installed, colab_python):
    installs = {item["metadata"]["name"].lower().replace("_", "-"): item["metadata"]["version"]
                for item in installed["dry_run"]["install"]}
    assert "llama3vision-min" in installs
    assert not KERNEL_PACKAGES & set(installs), ("the setup cell would replace "
                                                 f"{KERNEL_PACKAGES & set(installs)}")
    assert {"bitsandbytes", "llama-models", "matplotlib"} <= set(_installed(colab_python))  # the colab extra
    # nothing of the kernel changed, nothing added
    assert installed["kernel_after"] == installed["kernel_before"]
    assert (installed["kernel_after"]["ipykernel"],
            installed["kernel_after"]["ipython"]) == ("5.5.6", "7.34.0")
    assert "llama3vision-min[colab]" in "".join(output.get("text", "")
                                                for output in installed["setup_output"])


def _installed(python):
    listed = json.loads(_run(python, "-m", "pip", "list", "--format", "json"))
    return {item["name"].lower().replace("_", "-"): item["version"] for item in listed}


def _kernel_versions(python):
    return {name: version for name, version in _installed(python).items() if name in KERNEL_PACKAGES}


def test_the_wheel_holds_every_file_of_the_package_and_is_not_editable(installed, colab_python, clone):
    probe = ("import importlib.metadata as m, json, llama3vision_min as p\n"
             "from llama3vision_min.tools.backend import PHOTO\n"
             "from llama3vision_min.miniature import CHECKPOINT_DIR\n"
             "d = m.distribution('llama3vision-min')\n"
             "print(json.dumps({'files': [str(f) for f in d.files], 'module': p.__file__,\n"
             "                  'photo': PHOTO.is_file(), "
             "'mini': (CHECKPOINT_DIR / 'model.safetensors').is_file(),\n"
             "                  'direct_url': json.loads(d.read_text('direct_url.json'))}))\n")
    found = json.loads(_run(colab_python, "-c", probe, cwd=clone.parent))
    wanted = {str(path.relative_to(clone)) for path in (clone / "llama3vision_min").rglob("*")
              if path.is_file() and "__pycache__" not in path.parts}
    assert not wanted - set(found["files"]), f"missing from the wheel: {sorted(wanted - set(found['files']))}"
    assert "llama3vision_original.py" in found["files"]
    assert "site-packages" in found["module"] and found["photo"] and found["mini"]
    assert found["direct_url"]["url"] == _repo_url() and found["direct_url"]["vcs_info"]["vcs"] == "git"
    assert "dir_info" not in found["direct_url"]  # built and installed from git, not an editable folder


BACKENDS = ("real", "auto")
AT_ONCE = 2
"""Notebooks run two at a time (one kernel each, one thread of torch each): on 2 cores the rehearsal takes
about two thirds of the time it takes one after another (kernel start-up and imports run alone)."""


def _run_alone(path, backend, fake_hub, home):
    """Copy ``path`` alone into an empty folder and run it, with a probe cell at the end: (notebook,
    seconds)."""
    folder = home / "content"  # Colab's working folder: nothing of the repository beside the notebook
    folder.mkdir(parents=True)
    shutil.copy(path, folder / path.name)
    notebook = nbformat.read(folder / path.name, as_version=4)
    notebook.cells.append(nbformat.v4.new_code_cell(
        "import IPython, llama3vision_min, sys\n"
        "print('probe:', llama3vision_min.__file__, IPython.__version__, 'google.colab' in sys.modules)"))
    env = {**_kernel_env(fake_hub, backend, home),
           "OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 2) // AT_ONCE))}
    return notebook, _execute(notebook, folder, env)


@pytest.fixture(scope="module")
def runs(installed, fake_hub, tmp_path_factory):
    """Every notebook on both backends:
    ``{(stem, backend): (notebook, seconds) or the exception it raised}``."""
    from concurrent.futures import ThreadPoolExecutor

    def attempt(job):
        path, backend = job
        try:
            return _run_alone(path, backend, fake_hub, tmp_path_factory.mktemp(f"{path.stem}-{backend}"))
        except Exception as error:  # reported by the job's own test
            return error

    jobs = [(path, backend) for path in NOTEBOOKS for backend in BACKENDS]
    with ThreadPoolExecutor(AT_ONCE) as pool:
        done = dict(zip([(path.stem, backend) for path, backend in jobs], pool.map(attempt, jobs)))
    for (stem, backend), result in done.items():
        if not isinstance(result, Exception):
            RESULTS.append((f"{stem} ({backend}, {AT_ONCE} at a time)", result[1], ""))
    return done


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda path: path.stem)
def test_each_notebook_runs_alone_from_the_wheel_in_colabs_kernel(runs, path, backend):
    result = runs[path.stem, backend]
    if isinstance(result, Exception):
        raise result
    notebook, _ = result
    text = ["".join(output.get("text", "")) for cell in notebook.cells if cell.cell_type == "code"
            for output in cell.outputs]
    # the probe cell's whole output: the kernel may send one print in more than one stream message
    probe = "".join("".join(output.get("text", "")) for output in notebook.cells[-1].outputs)
    assert f"{VENV}/lib" in probe and "site-packages" in probe and " 7.34.0 True" in probe, probe
    expected = "backend: real" if backend == "real" else "backend: mini"
    assert (path.stem.startswith("02")
            or any(expected in chunk for chunk in text)), f"{path.name}: no '{expected}'"
