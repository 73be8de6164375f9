"""Stage 1 beyond one process and beyond one sitting: the trainer's command line, run for real.

Every run is ``python -m llama3vision_min.training.stage1``'s ``main`` in processes of its own (through
``stage1_probe.py``, which logs what each process reads and can stop it mid-run): one process, or two
started by ``accelerate launch`` that average their gradients over gloo. On the fake Hub's tiny Llama 3
and SigLIP and 20 LLaVA-Pretrain-style pairs, global batch 8, 3 epochs: 2 updates per epoch (16 pairs;
the 4 left over in each epoch's order wait for another epoch), 6 updates, a checkpoint after update 3.

Tolerance: two processes each average their 4 examples' loss and DDP averages the two gradients; one
process accumulates two halves of the same 8 examples. Halving and adding two numbers are exact in
binary floating point, so on a CPU the projectors come out identical (0.0 apart here); the tests allow
1e-6, what a reduction in another order (more processes, NCCL on GPUs) may cost. A wrong global batch
moves them by about 1e-3.
"""

import json
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

from llama3vision_min.training.data import EpochOrder

from conftest import make_image, offline_env

PROBE = Path(__file__).with_name("stage1_probe.py")
PAIRS, GLOBAL_BATCH, PER_DEVICE, EPOCHS = 20, 8, 4, 3
TOLERANCE = 1e-6


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    """``data.json`` and ``images/``: 20 picture-caption pairs."""
    folder = tmp_path_factory.mktemp("pairs")
    (folder / "images").mkdir()
    entries = []
    for i in range(PAIRS):
        make_image(size=(30 + i, 40), seed=i).save(folder / "images" / f"{i:05d}.png")
        entries.append({"id": str(i), "image": f"{i:05d}.png", "conversations": [
            {"from": "human", "value": "<image>\nRender a clear and concise summary of the photo."},
            {"from": "gpt", "value": f"coloured noise number {i}"}]})
    (folder / "data.json").write_text(json.dumps(entries))
    return folder


def train(fake_hub, pairs, out, *extra, processes=1, crash_at=None):
    """Run the trainer; returns ``(completed process, {rank: example indices read, in order})``."""
    log = Path(out).with_name(Path(out).name + "-reads")
    shutil.rmtree(log, ignore_errors=True)
    log.mkdir(parents=True)
    argv = ["--data", str(pairs / "data.json"), "--images", str(pairs / "images"), "--out", str(out),
            "--per-device-batch", str(PER_DEVICE), "--global-batch", str(GLOBAL_BATCH),
            "--epochs", str(EPOCHS), "--save-every", "3", "--num-workers", "0", *extra]
    launch = []
    if processes > 1:  # accelerate's --cpu starts one process (more only through mpirun): torchrun does
        with socket.socket() as free:
            free.bind(("127.0.0.1", 0))
            port = free.getsockname()[1]
        launch = ["-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(processes),
                  "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                  "--main_process_port", str(port)]
    extra_env = {"PROBE_LOG": str(log)} | ({"PROBE_CRASH_AT": str(crash_at)} if crash_at else {})
    done = subprocess.run([sys.executable, *launch, str(PROBE), *argv], capture_output=True, text=True,
                          env=offline_env(fake_hub, **extra_env), timeout=300)
    reads = {int(path.stem.removeprefix("reads-")): [int(line) for line in path.read_text().split()]
             for path in log.glob("reads-*.txt")}
    return done, reads


def projector(out):
    return load_file(str(Path(out) / "mm_projector.safetensors"))


def history(out):
    return json.loads((Path(out) / "trainer_state.json").read_text())["history"]


def apart(a, b):
    """The largest difference between two projectors' weights."""
    return max((a[key] - b[key]).abs().max().item() for key in a)


@pytest.fixture(scope="module")
def one_process(fake_hub, pairs, tmp_path_factory):
    out = tmp_path_factory.mktemp("one") / "out"
    done, reads = train(fake_hub, pairs, out)
    assert done.returncode == 0 and "6 updates" in done.stdout, done.stderr[-3000:]
    return out, done, reads


@pytest.fixture(scope="module")
def two_processes(fake_hub, pairs, tmp_path_factory):
    out = tmp_path_factory.mktemp("two") / "out"
    done, reads = train(fake_hub, pairs, out, processes=2)
    assert done.returncode == 0 and "6 updates" in done.stdout, done.stderr[-3000:]
    return out, done, reads


def test_the_same_command_twice_trains_the_same_projector_bit_for_bit(fake_hub, pairs, one_process, tmp_path):
    """--seed fixes the fresh projector's weights too (they were drawn before the seed was set: two runs
    came out 0.36 apart); another seed gives another projector."""
    again, _ = train(fake_hub, pairs, tmp_path / "again")
    assert again.returncode == 0, again.stderr[-3000:]
    assert apart(projector(one_process[0]), projector(tmp_path / "again")) == 0.0
    other, _ = train(fake_hub, pairs, tmp_path / "seed1", "--seed", "1", "--max-steps", "1")
    assert other.returncode == 0, other.stderr[-3000:]
    assert apart(projector(one_process[0]), projector(tmp_path / "seed1")) > 1e-2


def test_two_processes_train_the_projector_one_process_trains(fake_hub, pairs, one_process, two_processes,
                                                              tmp_path):
    one, two = one_process[0], two_processes[0]
    assert apart(projector(one), projector(two)) <= TOLERANCE
    assert [entry["lr"] for entry in history(one)] == [entry["lr"] for entry in history(two)]
    losses = [entry["loss"] for entry in history(two)]  # the mean over all 8 examples, in both
    assert [entry["loss"] for entry in history(one)] == pytest.approx(losses, abs=1e-5)
    # negative control: another global batch (4: one process, no accumulation) trains another projector
    done, _ = train(fake_hub, pairs, tmp_path / "batch4", "--global-batch", "4")
    assert done.returncode == 0, done.stderr[-3000:]
    assert apart(projector(one), projector(tmp_path / "batch4")) > 1000 * TOLERANCE


def test_two_processes_share_out_each_update_the_examples_one_process_reads(one_process, two_processes):
    """Each epoch: the same order in both runs (``EpochOrder``), dealt out in per-device batches --
    process 0 takes one, process 1 the next -- so each update's 8 examples are the same, none read twice,
    and 4 of the 20 left out (different ones each epoch)."""
    one, two = one_process[2][0], two_processes[2]
    assert sorted(two) == [0, 1] and len(one) == len(two[0]) + len(two[1]) == EPOCHS * 16
    order = EpochOrder(PAIRS, GLOBAL_BATCH, seed=0)
    left_out = []
    for epoch in range(EPOCHS):
        order.set_epoch(epoch)
        expected = list(order)
        assert one[epoch * 16: (epoch + 1) * 16] == expected
        for update in range(2):
            per_process = [two[rank][epoch * 8 + update * 4: epoch * 8 + update * 4 + 4] for rank in (0, 1)]
            assert per_process[0] + per_process[1] == expected[update * 8: update * 8 + 8]
        assert len(set(expected)) == 16
        left_out.append(set(range(PAIRS)) - set(expected))
    assert all(len(rest) == 4 for rest in left_out) and len({frozenset(rest) for rest in left_out}) > 1


def test_two_processes_write_one_projector_and_show_one_progress_bar(two_processes):
    out, done, _ = two_processes
    assert sorted(path.name for path in out.iterdir()) == ["checkpoint-3", "mm_projector.safetensors",
                                                           "trainer_state.json"]
    assert sorted(path.name for path in (out / "checkpoint-3").iterdir()) == [
        "mm_projector.safetensors", "optimizer.bin", "random_states_0.pkl", "random_states_1.pkl",
        "trainer_state.json"]
    assert done.stderr.count("stage 1 (projector):   0%") == 1 and done.stderr.count("no GPU") == 1
    assert done.stdout.count("6 updates") == 1 and "examples/s" in done.stdout


@pytest.mark.parametrize("processes", [1, 2])
def test_a_run_stopped_mid_way_and_resumed_ends_with_the_projector_of_an_uninterrupted_one(
        fake_hub, pairs, one_process, two_processes, tmp_path, processes):
    """Stopped when about to read the first batch of epoch 3 (after update 4, past checkpoint-3), resumed
    from checkpoint-3: update 4 is done again, on the same examples; the projector is the same, bit for
    bit. A checkpoint of two processes resumes in one as well."""
    out = tmp_path / "out"
    stopped, _ = train(fake_hub, pairs, out, processes=processes, crash_at=32 // processes + 1)
    assert stopped.returncode != 0 and "the probe stopped process" in stopped.stderr
    assert sorted(path.name for path in out.iterdir()) == ["checkpoint-3"]
    assert json.loads((out / "checkpoint-3" / "trainer_state.json").read_text())["update"] == 3

    refused, _ = train(fake_hub, pairs, out, processes=processes)
    assert refused.returncode == 1 and "holds checkpoints of an unfinished run" in refused.stderr

    if processes == 2:  # the checkpoint goes on in one process too
        shutil.copytree(out / "checkpoint-3", tmp_path / "elsewhere" / "checkpoint-3")
        alone, _ = train(fake_hub, pairs, tmp_path / "elsewhere", "--resume")
        assert alone.returncode == 0, alone.stderr[-3000:]
        assert apart(projector(tmp_path / "elsewhere"), projector(one_process[0])) <= TOLERANCE

    resumed, reads = train(fake_hub, pairs, out, "--resume", processes=processes)
    assert resumed.returncode == 0 and "6 updates" in resumed.stdout, resumed.stderr[-3000:]
    assert sum(len(indices) for indices in reads.values()) == 3 * GLOBAL_BATCH  # updates 4 to 6
    uninterrupted = (one_process if processes == 1 else two_processes)[0]
    assert apart(projector(out), projector(uninterrupted)) == 0.0
    assert history(out) == history(uninterrupted)

    if processes == 1:  # --overwrite starts over: the old checkpoints go, the new run's projector comes
        over, _ = train(fake_hub, pairs, out, "--overwrite", "--max-steps", "1")
        assert over.returncode == 0 and "1 updates" in over.stdout, over.stderr[-3000:]
        assert sorted(path.name for path in out.iterdir()) == ["mm_projector.safetensors",
                                                               "trainer_state.json"]
        assert apart(projector(out), projector(uninterrupted)) > 1e-3
