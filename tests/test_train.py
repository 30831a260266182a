"""A tiny training run on synthetic data: the loss falls, checkpoints are written and resumed, eval runs."""

import json

import pytest
import torch

from detector.checkpoint import WeightsError, load_checkpoint, load_model
from detector.cli import main
from detector.train import TrainConfig, train
from synthetic_data import make_voc_tree


@pytest.fixture(scope="module")
def voc(tmp_path_factory):
    return make_voc_tree(tmp_path_factory.mktemp("voc"))


def _cfg(voc, out, epochs):
    return TrainConfig(data=str(voc.root), out=str(out), train_split=voc.split, val_split=voc.split, epochs=epochs,
                       batch_size=4, lr=0.02, warmup_epochs=0.5, input_size=(96, 64), num_workers=0,
                       cache_max_side=160, eval_every=1, progress=False)


def test_training_lowers_loss_writes_and_resumes(voc, tmp_path):
    torch.manual_seed(0)
    out = tmp_path / "run"
    train(_cfg(voc, out, 2))
    assert load_checkpoint(out / "last.pt")["epoch"] == 2
    train(_cfg(voc, out, 12), resume=True)  # extend the schedule and continue from epoch 3
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == list(range(1, 13))
    assert rows[-1]["loss"] < 0.7 * rows[0]["loss"], [round(r["loss"], 3) for r in rows]
    assert all(0.0 <= r["val_ap50"] <= 1.0 for r in rows)
    assert (out / "curves.png").stat().st_size > 1000
    ckpt = load_checkpoint(out / "last.pt")
    assert ckpt["epoch"] == 12 and {"optimizer", "scheduler", "ema_state_dict", "train_config"} <= set(ckpt)
    model, meta = load_model(out / "final.pt")
    assert model.config.input_size == (96, 64) and meta["epochs"] == 12


def test_resume_without_checkpoint_is_a_clear_error(voc, tmp_path):
    with pytest.raises(WeightsError, match="no checkpoint"):
        train(_cfg(voc, tmp_path / "none", 1), resume=True)


def test_eval_cli_on_synthetic_set(voc, tmp_path, capsys):
    out = tmp_path / "run"
    train(_cfg(voc, out, 1))
    pr = tmp_path / "pr.png"
    code = main(["eval", "--weights", str(out / "final.pt"), "--data", str(voc.root), "--split", voc.split,
                 "--json", "--pr-curve", str(pr)])
    assert code == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["images"] == 9 and result["model"] == "rnnpool_face_m4"
    assert 0.0 <= result["ap50"] <= 1.0 and 0.0 <= result["ap"] <= result["ap50"] + 1e-9
    assert pr.stat().st_size > 1000


def test_torchrun_ddp_on_cpu(voc, tmp_path):
    """Two gloo processes via torchrun: rank 0 writes the checkpoint and metrics, every rank exits cleanly."""
    import shutil
    import subprocess
    import sys
    from pathlib import Path

    torchrun = Path(sys.executable).with_name("torchrun")
    if not torchrun.exists():
        pytest.skip("torchrun is not installed beside this python")
    out = tmp_path / "ddp"
    cmd = [str(torchrun), "--nproc_per_node=2", "-m", "detector.cli", "train", "--data", str(voc.root),
           "--train-split", voc.split, "--val-split", "none", "--epochs", "1", "--batch-size", "2",
           "--workers", "0", "--no-progress", "--out", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.count("done:") == 1
    assert load_checkpoint(out / "last.pt")["epoch"] == 1
    shutil.rmtree(out)


def test_ema_warmup_follows_the_model_early():
    from detector.train import ema_with_warmup

    avg = ema_with_warmup(0.999)
    old, new = torch.zeros(3), torch.ones(3)
    # After one update (n = 1) the decay is 2/11, not 0.999: the EMA moves 9/11 of the way.
    torch.testing.assert_close(avg(old, new, torch.tensor(1)), torch.full((3,), 9 / 11))
    # Late in training the decay is capped at 0.999.
    torch.testing.assert_close(avg(old, new, torch.tensor(100000)), torch.full((3,), 0.001))
    # Integer buffers (BatchNorm's num_batches_tracked) take the current value.
    assert avg(torch.tensor(3), torch.tensor(7), torch.tensor(5)).item() == 7


def test_kill_9_then_resume_continues_from_the_last_complete_epoch(voc, tmp_path):
    """SIGKILL a real training process after its first checkpoint; --resume finishes the run with the stored
    optimiser and scheduler state and one metrics row per epoch."""
    import os
    import signal
    import subprocess
    import sys
    import time

    out = tmp_path / "killed"
    cmd = [sys.executable, "-m", "detector.cli", "train", "--data", str(voc.root), "--train-split", voc.split,
           "--val-split", "none", "--epochs", "4", "--batch-size", "2", "--workers", "0", "--no-progress",
           "--out", str(out)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while not (out / "last.pt").exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    assert (out / "last.pt").exists(), proc.stderr.read().decode()[-2000:] if proc.poll() is not None else "timeout"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    killed_at = load_checkpoint(out / "last.pt")["epoch"]  # a complete checkpoint, never a torn file
    assert killed_at >= 1

    resumed = subprocess.run([*cmd, "--resume"], capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    ckpt = load_checkpoint(out / "last.pt")
    assert ckpt["epoch"] == 4
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2, 3, 4]
    steps_per_epoch = 4  # 9 images, batch 2, drop_last
    assert ckpt["scheduler"]["last_epoch"] == 4 * steps_per_epoch
    assert all("momentum_buffer" in s for s in ckpt["optimizer"]["state"].values())


def test_non_finite_loss_stops_with_a_clear_message_and_keeps_the_last_good_checkpoint(voc, tmp_path, monkeypatch,
                                                                                        capsys):
    from detector.loss import MultiBoxLoss

    out = tmp_path / "nan"
    train(_cfg(voc, out, 1))
    good = load_checkpoint(out / "last.pt")
    real_forward = MultiBoxLoss.forward

    def poisoned(self, *args, **kwargs):
        result = real_forward(self, *args, **kwargs)
        result.loss = result.loss * float("nan")
        return result

    monkeypatch.setattr(MultiBoxLoss, "forward", poisoned)
    code = main(["train", "--data", str(voc.root), "--train-split", voc.split, "--val-split", "none", "--epochs", "3",
                 "--batch-size", "4", "--workers", "0", "--no-progress", "--out", str(out), "--resume"])
    err = capsys.readouterr().err
    assert code != 0 and "non-finite loss at epoch 2" in err and "Traceback" not in err
    after = load_checkpoint(out / "last.pt")
    assert after["epoch"] == good["epoch"] == 1
    torch.testing.assert_close(after["state_dict"], good["state_dict"])


def test_eval_cli_on_wider_layout_ignores_invalid_faces(tmp_path, capsys):
    from synthetic_data import make_wider_tree

    wider = make_wider_tree(tmp_path / "wider")
    weights = tmp_path / "w.pt"
    from detector import build_model
    from detector.checkpoint import save_weights

    save_weights(weights, build_model("rnnpool_face_m4"))
    assert main(["eval", "--weights", str(weights), "--data", str(wider.root), "--json"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["split"] == "val" and result["images"] == wider.expected["images"]
