"""Execute every notebook in this folder in place, so the committed outputs are real.

    make notebooks          (or: python notebooks/execute.py [NAME.ipynb ...])

Run offline (the Makefile sets HF_HUB_OFFLINE=1) so the stored outputs are those of the
offline backend, which is what nbval compares in CI.
"""

import sys
import time
from pathlib import Path

import nbformat
from nbclient import NotebookClient

HERE = Path(__file__).resolve().parent


def execute(path):
    notebook = nbformat.read(path, as_version=4)
    start = time.perf_counter()
    NotebookClient(notebook, timeout=600, kernel_name="python3",
                   resources={"metadata": {"path": str(HERE)}}).execute()
    nbformat.write(notebook, path)
    return time.perf_counter() - start


if __name__ == "__main__":
    names = sys.argv[1:] or sorted(p.name for p in HERE.glob("*.ipynb"))
    for name in names:
        print(f"{name}: {execute(HERE / name):.1f} s", flush=True)
