"""Scale-out: `generate` and `evaluate` under `accelerate launch` with 2 CPU processes write exactly the images,
and the table, that one process writes; plus --prompts and --real."""

from __future__ import annotations

import csv
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from selfcascade.cli import main
from selfcascade.image_sets import real_folder_set
from selfcascade.metrics.emoji_features import DEFAULT_DIR


def _launch(*argv: str) -> subprocess.CompletedProcess:
    """`accelerate launch` of `python -m selfcascade` on 2 CPU processes. On a machine without GPUs accelerate
    starts several processes only through its torchrun launcher (--multi_gpu); --device cpu groups them with gloo."""
    with socket.socket() as s:  # a free port, so concurrent test runs do not meet
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(port),
           "-m", "selfcascade", *argv, "--device", "cpu", "--no-progress"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    return done


@pytest.fixture
def one_thread():
    """The in-process run on one thread, as each launched process is (OMP_NUM_THREADS=1): convolutions split
    over other thread counts round differently on some CPUs, which flips PNG levels by one."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _read_csv(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_generate_on_two_processes_writes_each_image_once_as_one_process_does(tiny_sd_dir: Path, tmp_path: Path,
                                                                             capsys, one_thread) -> None:
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("red apple\n\nblue car\n")  # the blank line is skipped
    # --batch-size 1 in both runs: batched convolutions round differently, which could flip a PNG level
    common = ["generate", "--prompts", str(prompts), "--model", str(tiny_sd_dir), "--size", "64", "--steps", "2",
              "--seeds", "3-5", "--batch-size", "1"]
    assert main([*common, "-o", str(tmp_path / "one" / "x.png"), "--device", "cpu", "--no-progress"]) == 0
    capsys.readouterr()
    done = _launch(*common, "-o", str(tmp_path / "two" / "x.png"))

    names = [f"x-p{p}-{s}.png" for p in range(2) for s in (3, 4, 5)]
    assert sorted(p.name for p in (tmp_path / "one").iterdir()) == sorted(names)
    assert sorted(p.name for p in (tmp_path / "two").iterdir()) == sorted(names)  # no temp files left either
    printed = [Path(line).name for line in done.stdout.splitlines() if line.endswith(".png")]
    assert sorted(printed) == sorted(names), done.stdout  # every image made by exactly one process
    for name in names:
        assert (tmp_path / "two" / name).read_bytes() == (tmp_path / "one" / name).read_bytes(), name
    info = json.loads(Image.open(tmp_path / "two" / "x-p1-4.png").text["selfcascade"])
    assert info["prompt"] == ["blue car"] and info["seed"] == 4
    assert "2 processes wrote 6 images (3 + 3)" in done.stderr


def _real_folder(folder: Path) -> Path:
    """Four smooth random photos of mixed aspect ratios, and one too small for 64 px (skipped)."""
    rng = np.random.default_rng(0)
    folder.mkdir()
    for i, (w, h) in enumerate([(96, 72), (72, 100), (80, 80), (128, 70), (50, 50)]):
        coarse = Image.fromarray(rng.integers(0, 255, (4, 4, 3), dtype=np.uint8))
        coarse.resize((w, h), Image.Resampling.BILINEAR).save(folder / f"{i}.jpg" if i % 2 else folder / f"{i}.png")
    return folder


@pytest.mark.skipif(not (DEFAULT_DIR / "model.safetensors").exists(), reason="shipped emoji feature weights missing")
def test_evaluate_on_two_processes_gives_one_process_table(tiny_sd_dir: Path, tmp_path: Path, one_thread) -> None:
    real = _real_folder(tmp_path / "real")
    prompts = tmp_path / "captions.txt"
    prompts.write_text("".join(f"shape {i}\n" for i in range(5)))
    common = ["evaluate", "--model", str(tiny_sd_dir), "--modes", "direct", "tuning-free", "--sizes", "64",
              "--prompts", str(prompts), "--num-images", "4", "--real", str(real), "--num-real", "4", "--steps", "2",
              "--guidance", "1", "--features", "emoji", "--batch-size", "1", "--crops-per-image", "2"]
    assert main([*common, "--out", str(tmp_path / "one"), "--device", "cpu", "--no-progress"]) == 0
    done = _launch(*common, "--out", str(tmp_path / "two"))

    one, two = _read_csv(tmp_path / "one" / "results.csv"), _read_csv(tmp_path / "two" / "results.csv")
    timing = {"s_per_image"}
    assert [{k: v for k, v in r.items() if k not in timing} for r in two] == \
        [{k: v for k, v in r.items() if k not in timing} for r in one]
    assert [(r["mode"], r["n_gen"], r["n_real"]) for r in two] == [("direct", "4", "4"), ("tuning-free", "4", "4")]
    assert done.stderr.count("scoring ") == 2  # the main process alone scores
    for folder in ("direct-32", "direct-64", "tuning-free-64"):
        cache = tmp_path / "two" / "generated" / folder
        assert json.loads((cache / "meta.json").read_text())["generated"] == 4  # both processes' shares counted
        for i in range(4):
            assert (cache / f"{i:05d}.png").read_bytes() == \
                (tmp_path / "one" / "generated" / folder / f"{i:05d}.png").read_bytes()
    table = (tmp_path / "two" / "results.md").read_text()
    assert "4 captions from" in table and f"images of `{real}`" in table


def test_real_folder_is_centre_cropped_resized_and_filtered(tmp_path: Path, caplog) -> None:
    folder = tmp_path / "real"
    folder.mkdir()
    left_red = np.zeros((40, 100, 3), np.uint8)  # 100 wide: the centre 40x40 square is blue, the sides red
    left_red[:, :30] = left_red[:, 70:] = (255, 0, 0)
    left_red[:, 30:70] = (0, 0, 255)
    Image.fromarray(left_red).save(folder / "a.png")
    Image.new("RGB", (20, 30)).save(folder / "b.png")  # too small for 32 px: skipped, with a warning
    images = real_folder_set(folder, 32, count=5).read_all()
    assert images.shape == (1, 3, 32, 32)
    assert images[0, 2].min() > 0.9 and images[0, 0].max() < 0.1  # only the centre square, all blue
    assert "skipped 1 image(s) smaller than 32 px" in caplog.text
    with pytest.raises(ValueError, match="no image is at least 64 px"):
        real_folder_set(folder, 64, count=5)
    with pytest.raises(FileNotFoundError, match="no images"):
        real_folder_set(tmp_path / "missing", 32, count=5)


def test_prompt_options_are_checked_before_loading_a_model(tmp_path: Path, capsys) -> None:
    with pytest.raises(SystemExit, match="give a prompt or --prompts FILE"):
        main(["generate", "--model", "no-such-model"])
    (tmp_path / "p.txt").write_text("apple\n")
    with pytest.raises(SystemExit, match="give a prompt or --prompts FILE"):
        main(["generate", "apple", "--prompts", str(tmp_path / "p.txt"), "--model", "no-such-model"])
    (tmp_path / "blank.txt").write_text("\n  \n")
    assert main(["generate", "--prompts", str(tmp_path / "blank.txt"), "--model", "no-such-model"]) == 2
    assert "holds no prompts" in capsys.readouterr().err
    assert main(["generate", "--prompts", str(tmp_path / "nope.txt"), "--model", "no-such-model"]) == 2
    assert "no such file" in capsys.readouterr().err
