"""The notebooks are committed executed, open with a consistent Colab badge and setup cell,
and keep nbval's comparisons meaningful (few exemptions, never on the cells that teach)."""

import re
from pathlib import Path

import nbformat
import pytest

ROOT = Path(__file__).resolve().parents[2]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))
EXEMPT_MARKERS = ("NBVAL_SKIP", "NBVAL_IGNORE_OUTPUT")
EXEMPT_TAGS = ("nbval-skip", "nbval-ignore-output")


def repository_url():
    match = re.search(r"^Repository: (https://github\.com/([\w.-]+/[\w.-]+))\s*$",
                      (ROOT / "README.md").read_text(), re.M)
    assert match, "README.md must hold one line 'Repository: https://github.com/OWNER/NAME'"
    return match.group(1), match.group(2)


def code_cells(notebook):
    return [cell for cell in notebook.cells if cell.cell_type == "code"]


def is_exempt(cell):
    tags = cell.get("metadata", {}).get("tags", [])
    return any(marker in cell.source for marker in EXEMPT_MARKERS) or any(tag in tags for tag in EXEMPT_TAGS)


def test_there_are_at_least_five_notebooks():
    assert len(NOTEBOOKS) >= 5, [p.name for p in NOTEBOOKS]


@pytest.fixture(params=NOTEBOOKS, ids=lambda p: p.name)
def notebook(request):
    return request.param, nbformat.read(request.param, as_version=4)


def test_committed_executed(notebook):
    path, nb = notebook
    counts = [cell.execution_count for cell in code_cells(nb)]
    assert all(count is not None for count in counts), f"{path.name}: some code cells were never executed"
    assert counts == list(range(1, len(counts) + 1)), (f"{path.name}: cells were not run once, "
                                                       f"top to bottom: {counts}")
    errors = [o for cell in code_cells(nb) for o in cell.outputs if o.output_type == "error"]
    assert not errors, f"{path.name}: stored outputs contain an error: {errors[0].get('ename')}"


def test_opens_with_the_colab_badge_of_this_repository(notebook):
    path, nb = notebook
    _, slug = repository_url()
    first = nb.cells[0]
    assert first.cell_type == "markdown"
    link = f"https://colab.research.google.com/github/{slug}/blob/main/notebooks/{path.name}"
    assert link in first.source, f"{path.name}: the first cell must link to {link}"


def test_setup_cell_is_the_same_everywhere_and_names_this_repository(notebook):
    path, nb = notebook
    url, _ = repository_url()
    setup = code_cells(nb)[0].source
    assert url in setup and "google.colab" in setup, (f"{path.name}: the first code cell must be the "
                                                      "setup cell")
    reference = code_cells(nbformat.read(NOTEBOOKS[0], as_version=4))[0].source
    assert setup == reference, f"{path.name}: setup cell differs from {NOTEBOOKS[0].name}'s"


def test_backend_cell_is_overridable_by_one_variable_and_names_its_parts(notebook):
    """Every notebook's second code cell picks the backend (and says why), loading only the parts it names;
    02 loads no model at all, only Llama 3's own tokenizer."""
    path, nb = notebook
    cell = code_cells(nb)[1].source
    if path.name.startswith("02"):
        assert ("llama3_tokenizer()" in cell
                and "load_backend" not in "\n".join(c.source for c in code_cells(nb)))
        return
    assert "LLAMA3VISION_BACKEND" in cell and re.search(r"load_backend\(parts=\(.*\)\)", cell), path.name
    assert "print(backend.report())" in cell, (f"{path.name}: the backend cell must say why it chose "
                                               "its backend")


def test_the_setup_cell_installs_the_colab_extra_and_no_kernel_package():
    """Colab's own ipykernel/ipython/tornado must stay: the setup cell asks only for the colab extra."""
    setup = code_cells(nbformat.read(NOTEBOOKS[0], as_version=4))[0].source
    assert 'f"llama3vision-min[colab] @ git+{REPO_URL}"' in setup and "print(" in setup
    code = "\n".join(line for line in setup.splitlines() if not line.lstrip().startswith("#"))
    for package in ("ipykernel", "ipython", "tornado", "jupyter", "nbval", "nbclient", "[notebooks"):
        assert package not in code, f"the setup cell installs {package}"


def test_the_first_cell_says_what_the_real_path_costs_before_it_starts(notebook):
    """Which runtime, what the real path downloads and how long, the GPU memory, and that no token is
    asked."""
    path, nb = notebook
    first = nb.cells[0].source
    assert "**Runtime and cost.**" in first and "token or licence is asked" in first, path.name
    if path.name.startswith("02"):
        assert "downloads nothing" in first and "CPU is enough" in first
        return
    assert "T4 GPU" in first and re.search(r"\d+ GB", first) and "minute" in first, path.name
    assert re.search(r"(GB of GPU memory|GB of the T4)", first), (f"{path.name}: say how much GPU memory "
                                                                  "it needs")


def test_at_most_a_quarter_of_code_cells_are_exempt_from_comparison(notebook):
    path, nb = notebook
    cells = code_cells(nb)
    exempt = [cell for cell in cells if is_exempt(cell)]
    assert len(exempt) * 4 <= len(cells), f"{path.name}: {len(exempt)} of {len(cells)} code cells exempt"


def test_code_cells_stay_short_so_each_shows_one_idea(notebook):
    """No code cell over 25 lines, the setup and backend cells aside; drawing goes to tools/plots.py."""
    path, nb = notebook
    long = [(i, len(cell.source.strip().splitlines())) for i, cell in enumerate(code_cells(nb))
            if i >= 2 and len(cell.source.strip().splitlines()) > 25]
    assert not long, f"{path.name}: code cells (index, lines) over 25 lines: {long}"


def test_notebooks_import_the_package_rather_than_define_its_functions(notebook):
    path, nb = notebook
    public = ("tokenizer_image_token", "process_tensors", "splice_batch", "answer_question", "load_projector")
    for cell in code_cells(nb):
        for name in public:
            assert not re.search(rf"^\s*def {name}\(", cell.source, re.M), f"{path.name} redefines {name}"
    assert any("llama3vision_min" in cell.source for cell in code_cells(nb))


def test_no_code_line_is_over_100_characters(notebook):
    path, nb = notebook
    long = [(i, len(line)) for i, cell in enumerate(code_cells(nb)) for line in cell.source.splitlines()
            if len(line) > 100]
    assert not long, f"{path.name}: code lines over 100 characters (cell, length): {long}"


def test_at_most_five_teaching_cells_over_15_lines_in_all():
    """A cell that teaches shows one idea: over 15 lines only where the idea needs it (setup and backend
    aside)."""
    long = [(path.name, i, len(cell.source.strip().splitlines())) for path in NOTEBOOKS
            for i, cell in enumerate(code_cells(nbformat.read(path, as_version=4)))
            if i >= 2 and len(cell.source.strip().splitlines()) > 15]
    assert len(long) <= 5, f"{len(long)} code cells over 15 lines: {long}"


def test_the_first_cell_explains_the_nbval_marks(notebook):
    path, nb = notebook
    assert "NBVAL_SKIP" in nb.cells[0].source and "NBVAL_IGNORE_OUTPUT" in nb.cells[0].source, path.name


def test_each_notebook_ends_with_exercises_that_check_themselves(notebook):
    """Two or three exercises ("change X, predict Y, check it"), each with a solution cell that asserts."""
    path, nb = notebook
    starts = [i for i, cell in enumerate(nb.cells) if cell.cell_type == "markdown"
              and cell.source.lstrip().startswith("## Exercises")]
    assert starts, f"{path.name}: no '## Exercises' section"
    after = nb.cells[starts[-1] + 1:]
    solutions = [cell for cell in after if cell.cell_type == "code"]
    assert 2 <= len(solutions) <= 3, f"{path.name}: {len(solutions)} solution cells after '## Exercises'"
    for cell in solutions:
        assert re.search(r"^\s*assert ", cell.source, re.M), f"{path.name}: a solution without an assert"
        assert cell.source.lstrip().startswith("# Solution"), (f"{path.name}: solutions start with "
                                                               "'# Solution'")
