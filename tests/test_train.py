"""Training: data sets, checkpoints (atomic, weights_only), exact resume."""
import csv
import shutil

import pytest
import torch

from tests.helpers import DATA_DIR, ROOT, TRAIN, launched, run_module, torchrun
from train.checkpoint import FORMAT_VERSION, CheckpointError, load_checkpoint, save_checkpoint
from train.data import IDX_FILES, DataUnavailable, ensure_dataset, hold_out, load_split
from train.distributed import Group
from train.loop import build_run, load_data
from train.loop import train as train_loop

# the tutorial's recipe (a later --recipe wins): these tests are about the loop and its files
SMALL = ("--recipe", "seed", "--train-limit", "2000", "--validation-size", "500", "--test-limit", "500",
         "--threads", "1")


def train(checkpoint_dir, *extra):
    return run_module("train", "--dataset", "fashion-mnist", "--data-dir", str(DATA_DIR),
                      "--checkpoint-dir", str(checkpoint_dir), *SMALL, *extra)


@pytest.mark.slow
def test_checkpoints_hold_plain_data_and_what_export_needs(artifacts):
    state = torch.load(artifacts.checkpoint_dir / "last.pt", weights_only=True)
    assert state["epoch"] == 2 and state["architecture"] == "convnet"
    assert set(state) >= {"model_state", "optimizer_state", "rng_state", "settings", "metrics", "data"}
    assert state["settings"]["lr"] == 0.01 and state["settings"]["momentum"] == 0.5
    assert state["settings"]["batch_size"] == 64
    assert state["data"]["dataset"] == "fashion-mnist"
    assert state["data"]["classes"][9] == "Ankle boot"
    assert state["data"]["mean"] == pytest.approx(0.286, abs=0.002)
    assert state["data"]["std"] == pytest.approx(0.353, abs=0.002)
    assert state["data"]["splits"] == {"train": 55000, "validation": 5000, "test": 10000,
                                       "validation_held_out_of": "train", "validation_seed": 1,
                                       "validation_size": 1 / 12}
    assert state["data"]["augmentation"] == {"flip": False, "shift": 0, "robustness": 0.0,
                                             "robustness_ranges": {}}  # the seed recipe: none
    rows = list(csv.DictReader(open(artifacts.checkpoint_dir / "metrics.csv")))
    assert [int(r["epoch"]) for r in rows] == [1, 2]
    assert {"validation_loss", "validation_accuracy", "test_loss", "test_accuracy"} <= set(rows[0])
    assert (artifacts.checkpoint_dir / "curves.png").stat().st_size > 1000
    best = load_checkpoint(artifacts.checkpoint_dir / "best.pt")
    assert best["metrics"]["validation_accuracy"] == max(float(r["validation_accuracy"]) for r in rows)
    checkpoint = artifacts.bundle["checkpoint"]
    assert checkpoint["chosen_on"] == "validation accuracy"
    assert checkpoint["validation_accuracy"] == best["metrics"]["validation_accuracy"]
    assert checkpoint["test_accuracy"] == best["metrics"]["test_accuracy"]
    assert checkpoint["splits"]["validation"] == 5000 and checkpoint["splits"]["validation_size"] == 1 / 12
    assert checkpoint["recipe"] == "seed" and checkpoint["augmentation"] == state["data"]["augmentation"]


def test_the_validation_set_is_fixed_by_the_seed_and_never_trained_on(fashion_test_set):
    info = ensure_dataset("fashion-mnist", DATA_DIR, allow_download=False)
    cpu = torch.device("cpu")
    full = load_data(info, DATA_DIR, cpu, 5000, seed=1)
    limited = load_data(info, DATA_DIR, cpu, 5000, seed=1, train_limit=2000,
                        normalization=(full.mean, full.std))  # else the limited set's own statistics
    other_seed = load_data(info, DATA_DIR, cpu, 5000, seed=2)
    assert full.sizes() == {"train": 55000, "validation": 5000, "test": 10000}
    assert torch.equal(full.x_val, limited.x_val) and torch.equal(full.y_val, limited.y_val)
    assert torch.equal(full.x_train[:2000], limited.x_train)
    assert not torch.equal(full.x_val, other_seed.x_val)
    # the two parts are exactly the training set: nothing held out is trained on
    whole = load_split(info, DATA_DIR, train=True)
    rest, held = hold_out(whole, 5000, seed=1)
    assert len(rest) + len(held) == len(whole)
    assert torch.equal(torch.sort(torch.cat([rest.labels, held.labels])).values, torch.sort(whole.labels).values)
    sums = lambda images: torch.sort(images.flatten(1).sum(1)).values  # noqa: E731
    assert torch.equal(sums(torch.cat([rest.images, held.images])), sums(whole.images))
    # a random draw, not a slice: every class is there in about its share (500 each)
    counts = torch.bincount(held.labels, minlength=10)
    assert counts.min() > 400 and counts.max() < 600, counts.tolist()
    with pytest.raises(ValueError, match="--validation-size"):
        hold_out(whole, 0, seed=1)


@pytest.mark.slow  # trains
def test_best_pt_is_chosen_on_validation_not_on_test(tmp_path):
    """The test labels are shifted by one class here, so that test accuracy no longer follows
    learning: best.pt must still follow the validation set."""
    torch.manual_seed(0)
    info = ensure_dataset("fashion-mnist", DATA_DIR, allow_download=False)
    data = load_data(info, DATA_DIR, torch.device("cpu"), 1000, seed=1, train_limit=3000, test_limit=1000)
    data.y_test = (data.y_test + 1) % 10
    from train.main import parse_args
    from train.settings import TrainingSettings
    # the seed recipe: lr 0.01, momentum 0.5, batch 64, no flips or shifts, seed 1
    settings = TrainingSettings.from_args(parse_args(["--recipe", "seed", "--checkpoint-dir", str(tmp_path)])).to_dict()
    run = build_run(settings, 4, tmp_path, torch.device("cpu"), Group(), data)
    train_loop(run, 4)
    history = run.history
    by_validation = max(history, key=lambda r: (r["validation_accuracy"], -r["validation_loss"],
                                                 -r["epoch"]))["epoch"]
    by_test = max(history, key=lambda r: (r["test_accuracy"], -r["epoch"]))["epoch"]
    assert by_validation != by_test, f"the set-up does not tell the two apart: {history}"
    assert load_checkpoint(tmp_path / "best.pt")["epoch"] == by_validation
    rows = list(csv.DictReader(open(tmp_path / "metrics.csv")))
    assert [float(r["test_accuracy"]) for r in rows] == [h["test_accuracy"] for h in history]


@pytest.mark.slow  # trains
@pytest.mark.parametrize("recipe", ["seed", "fast"])
def test_resume_is_bit_exact(tmp_path, recipe):
    # fast: one-cycle schedule state and the random flips must resume exactly too
    train(tmp_path / "straight", "--epochs", "2", "--recipe", recipe)
    train(tmp_path / "resumed", "--epochs", "2", "--recipe", recipe, "--stop-after-epoch", "1")
    assert load_checkpoint(tmp_path / "resumed" / "last.pt")["epoch"] == 1
    result = train(tmp_path / "resumed", "--epochs", "2", "--resume")
    assert "resumed from" in result.stdout
    assert "validation loss" in result.stdout and "test loss" in result.stdout
    straight = load_checkpoint(tmp_path / "straight" / "last.pt")
    resumed = load_checkpoint(tmp_path / "resumed" / "last.pt")
    assert resumed["epoch"] == 2
    for name, tensor in straight["model_state"].items():
        assert torch.equal(tensor, resumed["model_state"][name]), name
    assert [h["epoch"] for h in resumed["history"]] == [1, 2]


@pytest.mark.slow  # starts `python -m train`/`export`: seconds of imports
def test_resume_without_checkpoint_says_so(tmp_path):
    result = run_module("train", "--resume", "--checkpoint-dir", str(tmp_path), check=False)
    assert result.returncode != 0 and "no checkpoint at" in result.stderr


@pytest.mark.slow  # starts `python -m train`/`export`: seconds of imports
def test_a_checkpoint_of_an_older_format_is_not_resumed(tmp_path):
    settings = {"dataset": "fashion-mnist", "seed": 1, "lr": 0.01}  # from before the validation split
    save_checkpoint({"format_version": 1, "epoch": 1, "settings": settings}, tmp_path / "last.pt")
    result = run_module("train", "--resume", "--checkpoint-dir", str(tmp_path), check=False)
    assert result.returncode != 0 and "older `python -m train` (checkpoint format 1" in result.stderr
    assert "make train" in result.stderr and "--start-over" in result.stderr


def test_a_failed_write_leaves_the_previous_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "last.pt"
    save_checkpoint({"format_version": FORMAT_VERSION, "epoch": 1}, path)

    def crash(obj, f, *args, **kwargs):
        f.write(b"half a checkpoint")
        raise KeyboardInterrupt("killed mid-write")

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint({"format_version": FORMAT_VERSION, "epoch": 2}, path)
    monkeypatch.undo()
    assert load_checkpoint(path)["epoch"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]  # no temp file left behind


@pytest.mark.slow  # starts `python -m train`/`export`: seconds of imports
def test_pickled_objects_are_refused(tmp_path):
    import argparse
    evil = tmp_path / "evil.pt"
    torch.save({"format_version": 1, "settings": argparse.Namespace(lr=0.01)}, evil)
    with pytest.raises(CheckpointError, match="weights_only"):
        load_checkpoint(evil)
    result = run_module("export", "--checkpoint", str(evil), "--build-dir", str(tmp_path / "b"), check=False)
    assert result.returncode != 0 and "refusing" in result.stderr
    assert not (tmp_path / "b" / "model.pt").exists()


@pytest.mark.slow  # trains
def test_mnist_from_gzipped_idx_files(tmp_path):
    """`--dataset mnist` trains from the four IDX files in <data>/MNIST/raw, gzipped here.
    (Fashion-MNIST's files stand in: same format; MNIST cannot be downloaded here.)"""
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for name in IDX_FILES:
        shutil.copyfile(DATA_DIR / "FashionMNIST" / "raw" / f"{name}.gz", raw / f"{name}.gz")
    run_module("train", "--dataset", "mnist", "--data-dir", str(tmp_path), "--epochs", "1",
               "--checkpoint-dir", str(tmp_path / "ck"), *SMALL)
    state = load_checkpoint(tmp_path / "ck" / "best.pt")
    assert state["data"]["dataset"] == "mnist"
    assert state["data"]["classes"] == [str(d) for d in range(10)]


def test_missing_data_names_the_remedies(tmp_path):
    with pytest.raises(DataUnavailable) as caught:
        ensure_dataset("mnist", tmp_path, allow_download=False)
    message = str(caught.value)
    assert str(tmp_path / "MNIST" / "raw") in message and "download" in message


def test_auto_falls_back_to_fashion_mnist(tmp_path, capsys):
    shutil.copytree(DATA_DIR / "FashionMNIST", tmp_path / "FashionMNIST")
    info = ensure_dataset("auto", tmp_path, allow_download=False)
    assert info.name == "fashion-mnist"
    assert "took fashion-mnist" in capsys.readouterr().out


# ---------------------------------------------------------------- durability: kills, foreign files, full disks

# Runs `python -m train ...` with train.loop.save_checkpoint wrapped by FAULT (python source that
# defines `fault(real, state, path)`), to stop or fail the run at a chosen write.
WRAPPED_TRAIN = """
import runpy, sys
import train.loop
FAULT = sys.argv[1]
namespace = {}
exec(FAULT, namespace)
real = train.loop.save_checkpoint
train.loop.save_checkpoint = lambda state, path: namespace["fault"](real, state, path)
sys.argv = ["python -m train", *sys.argv[2:]]
runpy.run_module("train", run_name="__main__", alter_sys=True)
"""

KILL_AFTER_LAST_OF_AN_IMPROVED_EPOCH = """
import os, signal
def fault(real, state, path):
    real(state, path)
    if path.name == "last.pt" and state["epoch"] >= 2 and state["best_epoch"] == state["epoch"]:
        os.kill(os.getpid(), signal.SIGKILL)  # between last.pt and best.pt
"""

DISK_FULL_IN_EPOCH_2 = """
import errno, torch
def fault(real, state, path):
    if state["epoch"] == 2:
        def full(obj, f, *args, **kwargs):
            f.write(b"the first bytes of a checkpoint")
            raise OSError(errno.ENOSPC, "No space left on device")
        saved, torch.save = torch.save, full
        try:
            return real(state, path)
        finally:
            torch.save = saved
    return real(state, path)
"""


def train_with_fault(fault: str, checkpoint_dir, *extra):
    import subprocess
    import sys
    return subprocess.run([sys.executable, "-c", WRAPPED_TRAIN, fault, "--dataset", "fashion-mnist",
                           "--data-dir", str(DATA_DIR), "--checkpoint-dir", str(checkpoint_dir), *SMALL, *extra],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)


@pytest.mark.slow  # trains
def test_a_kill_between_last_and_best_is_repaired_from_last(tmp_path):
    killed = train_with_fault(KILL_AFTER_LAST_OF_AN_IMPROVED_EPOCH, tmp_path, "--epochs", "3", "--lr", "0.05")
    assert killed.returncode == -9, killed.stderr[-2000:]
    last, best = load_checkpoint(tmp_path / "last.pt"), load_checkpoint(tmp_path / "best.pt")
    assert last["best_epoch"] == last["epoch"] and best["epoch"] < last["epoch"]  # the window, caught
    result = train(tmp_path, "--epochs", str(last["epoch"]), "--resume")
    assert "was behind" in result.stdout
    best = load_checkpoint(tmp_path / "best.pt")
    assert best["epoch"] == last["best_epoch"] and best["run_id"] == last["run_id"]
    for name, tensor in last["model_state"].items():
        assert torch.equal(tensor, best["model_state"][name]), name
    assert best["metrics"] == last["history"][-1]


@pytest.mark.slow  # trains
def test_a_full_disk_keeps_the_previous_checkpoints(tmp_path):
    failed = train_with_fault(DISK_FULL_IN_EPOCH_2, tmp_path, "--epochs", "2")
    assert failed.returncode not in (0, -9)
    assert "No space left on device" in failed.stderr and "are intact" in failed.stderr
    assert "--resume" in failed.stderr
    assert load_checkpoint(tmp_path / "last.pt")["epoch"] == 1
    assert load_checkpoint(tmp_path / "best.pt")["epoch"] == 1
    assert not [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
    result = train(tmp_path, "--epochs", "2", "--resume")  # the way out it names works
    assert load_checkpoint(tmp_path / "last.pt")["epoch"] == 2, result.stdout


def resume_decision(checkpoint_dir, *flags, monkeypatch=None):
    """What train/main.py would resume from, asked in-process (rank 0 of 1)."""
    from train import distributed
    from train.main import checkpoint_to_resume, parse_args
    args = parse_args(["--checkpoint-dir", str(checkpoint_dir), *flags])
    return checkpoint_to_resume(args, distributed.Group())


def a_checkpoint(path, epoch=1, run_id="run-a", launch_id="", best_epoch=1):
    save_checkpoint({"format_version": FORMAT_VERSION, "epoch": epoch, "run_id": run_id, "launch_id": launch_id,
                     "best_epoch": best_epoch, "settings": {"epochs": 3}, "model_state": {}}, path)


def test_a_fresh_run_refuses_another_runs_folder(tmp_path):
    a_checkpoint(tmp_path / "last.pt")
    a_checkpoint(tmp_path / "best.pt")
    before = (tmp_path / "last.pt").read_bytes()
    with pytest.raises(SystemExit) as refused:
        resume_decision(tmp_path)
    message = str(refused.value)
    assert "another run's checkpoints" in message and "run run-a, epoch 1 of 3" in message
    assert "--resume" in message and "--start-over" in message and "--checkpoint-dir" in message
    assert (tmp_path / "last.pt").read_bytes() == before
    assert resume_decision(tmp_path, "--start-over") is None
    assert not (tmp_path / "last.pt").exists() and not (tmp_path / "best.pt").exists()


def test_a_restart_resumes_only_its_own_launch(tmp_path, monkeypatch):
    a_checkpoint(tmp_path / "last.pt", launch_id="launch-1")
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "1")
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "launch-2")
    with pytest.raises(SystemExit, match=r"written by another one \(launch-1, run run-a\)"):
        resume_decision(tmp_path)
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "launch-1")
    assert resume_decision(tmp_path)["run_id"] == "run-a"


@pytest.mark.parametrize("damage", ["truncated", "corrupt", "foreign"])
def test_a_damaged_or_foreign_last_pt_names_the_file_and_the_way_out(tmp_path, damage):
    last = tmp_path / "last.pt"
    a_checkpoint(last)
    data = last.read_bytes()
    if damage == "truncated":
        last.write_bytes(data[: len(data) // 2])
    elif damage == "corrupt":
        last.write_bytes(data[:100] + bytes(b ^ 0x5A for b in data[100:400]) + data[400:])
    else:
        torch.save({"model": torch.zeros(3)}, last)  # a checkpoint of something else
    with pytest.raises(SystemExit) as refused:
        resume_decision(tmp_path, "--resume")
    message = str(refused.value)
    assert str(last) in message and "--start-over" in message and "Move" in message, message


def test_stale_temporary_files_are_removed(tmp_path):
    a_checkpoint(tmp_path / "last.pt")
    (tmp_path / ".last.pt.k2j3h4.tmp").write_bytes(b"half")
    (tmp_path / ".metrics.csv.x.tmp").write_bytes(b"half")
    (tmp_path / "notes.tmp").write_bytes(b"not ours")
    resume_decision(tmp_path, "--resume")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best.pt", "last.pt", "notes.tmp"]


@pytest.mark.slow
def test_nodes_without_a_shared_folder_resume_from_rank_0s_state(tmp_path):
    """Two nodes on loopback, each with its own checkpoint folder: only node 0's holds last.pt.
    Rank 0 decides what to resume and hands the state over; node 1 never reads its folder."""
    from serve.process import free_ports
    limits = ["--train-limit", "3000", "--test-limit", "500"]
    run_module("train", *TRAIN[2:], *limits, "--epochs", "1", "--checkpoint-dir", str(tmp_path / "node0"))
    (tmp_path / "node1").mkdir()
    port = free_ports(1)[0]
    common = ["--nnodes=2", "--nproc_per_node=1", "--rdzv_backend=c10d",
              f"--rdzv_endpoint=127.0.0.1:{port}", "--rdzv_id=unshared-test"]
    args = [*TRAIN, *limits, "--epochs", "2", "--resume"]
    with open(tmp_path / "log0", "w") as log0, open(tmp_path / "log1", "w") as log1, \
            launched(torchrun(*common, "--node_rank=0", *args, "--checkpoint-dir", str(tmp_path / "node0")), log0) as node0, \
            launched(torchrun(*common, "--node_rank=1", *args, "--checkpoint-dir", str(tmp_path / "node1")), log1) as node1:
        assert node0.wait(timeout=300) == 0, (tmp_path / "log0").read_text()[-3000:]
        assert node1.wait(timeout=60) == 0, (tmp_path / "log1").read_text()[-3000:]
    assert "resumed from" in (tmp_path / "log0").read_text()
    state = load_checkpoint(tmp_path / "node0" / "last.pt")
    assert state["epoch"] == 2 and state["world_size"] == 2
    assert [h["epoch"] for h in state["history"]] == [1, 2]
    assert not list((tmp_path / "node1").iterdir())


@pytest.mark.slow  # starts `python -m train`/`export`: seconds of imports
def test_preparing_data_ignores_the_checkpoint_folder(tmp_path):
    """`make data` after a run: no refusal about the run's checkpoints."""
    a_checkpoint(tmp_path / "last.pt")
    result = run_module("train", "--dataset", "fashion-mnist", "--data-dir", str(DATA_DIR),
                        "--prepare-data-only", "--checkpoint-dir", str(tmp_path))
    assert "is ready" in result.stdout
