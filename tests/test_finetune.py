"""Full fine-tuning and LoRA baselines: training, resume, export, loading for direct inference (tiny models)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from selfcascade.loading import FINETUNE_INFO_FILE, FINETUNE_WEIGHTS_FILE, load_unet_weights
from selfcascade.cli import main
from selfcascade.testing import make_tiny_sd, make_tiny_sdxl

pytest.importorskip("peft")


def _finetune(model, data, run, *extra: str) -> int:
    return main(["finetune", "--model", str(model), "--data", str(data), "--size", "64", "--batch-size", "2",
                 "--run-dir", str(run), "--threads", "1", "--log-every", "1", "--lr", "1e-3", *extra])


def test_full_finetune_resumes_exports_and_loads_for_direct_inference(tiny_sd_dir, caption_folder, tmp_path):
    run = tmp_path / "full"
    assert _finetune(tiny_sd_dir, caption_folder, run, "--max-steps", "2") == 0
    assert _finetune(tiny_sd_dir, caption_folder, run, "--max-steps", "3", "--snapshot-every", "3") == 0
    state = json.loads((run / "checkpoint" / "state.json").read_text())
    assert state["step"] == 3 and [s for s, _ in state["losses"]] == [1, 2, 3]
    info = json.loads((run / "model" / FINETUNE_INFO_FILE).read_text())
    base = make_tiny_sd()
    assert info["method"] == "full" and info["steps"] == 3 and info["size"] == 64
    assert info["trainable_parameters"] == info["unet_parameters"] == base.unet.num_parameters()
    assert (run / "snapshots" / "step-000003" / FINETUNE_WEIGHTS_FILE).is_file()
    snapshot = json.loads((run / "snapshots" / "step-000003" / FINETUNE_INFO_FILE).read_text())
    assert snapshot["steps"] == 3 and 0 < snapshot["train_seconds"] <= state["train_seconds"] + 0.1

    tuned = load_file(str(run / "model" / FINETUNE_WEIGHTS_FILE))
    assert any(not torch.equal(tuned[k], v) for k, v in base.unet.state_dict().items())

    outputs = {}
    for name, extra in (("base", []), ("ft", ["--unet-weights", str(run / "model")])):
        outputs[name] = tmp_path / f"{name}.png"
        assert main(["generate", "red apple", "--model", str(tiny_sd_dir), "--size", "64", "--steps", "2",
                     "--mode", "direct", "--no-progress", "-o", str(outputs[name]), *extra]) == 0
    assert not np.array_equal(np.asarray(Image.open(outputs["base"])), np.asarray(Image.open(outputs["ft"])))


def test_lora_trains_only_adapters_and_merges_into_a_plain_unet(tiny_sd_dir, caption_folder, tmp_path):
    run = tmp_path / "lora"
    assert _finetune(tiny_sd_dir, caption_folder, run, "--method", "lora", "--rank", "2", "--max-steps", "2") == 0
    info = json.loads((run / "model" / FINETUNE_INFO_FILE).read_text())
    assert info["method"] == "lora" and info["rank"] == 2
    assert 0 < info["trainable_parameters"] < 0.2 * info["unet_parameters"]

    base = make_tiny_sd().unet
    merged = load_file(str(run / "model" / FINETUNE_WEIGHTS_FILE))
    assert set(merged) == set(base.state_dict())  # no adapter keys: loads into an unmodified UNet
    changed = {k for k, v in base.state_dict().items() if not torch.equal(merged[k], v)}
    assert changed and all(any(t in k for t in ("to_q", "to_k", "to_v", "to_out.0")) for k in changed)
    load_unet_weights(base, run / "model")
    assert all(torch.equal(base.state_dict()[k], merged[k]) for k in merged)


def test_weights_of_another_model_are_refused_with_both_names(tiny_sd_dir, caption_folder, tmp_path):
    run = tmp_path / "full"
    assert _finetune(tiny_sd_dir, caption_folder, run, "--max-steps", "1") == 0
    with pytest.raises(ValueError, match=f"fine-tuned from {tiny_sd_dir}"):
        load_unet_weights(make_tiny_sdxl().unet, run / "model")
    with pytest.raises(FileNotFoundError, match="selfcascade finetune"):
        load_unet_weights(make_tiny_sd().unet, tmp_path)


def test_resuming_under_other_settings_is_refused_naming_them(tiny_sd_dir, caption_folder, tmp_path, capsys):
    run = tmp_path / "run"
    assert _finetune(tiny_sd_dir, caption_folder, run, "--max-steps", "1") == 0
    assert _finetune(tiny_sd_dir, caption_folder, run, "--max-steps", "2", "--batch-size", "1") == 2
    assert "batch_size: run has 2, now 1" in capsys.readouterr().err
    assert json.loads((run / "checkpoint" / "state.json").read_text())["step"] == 1  # the run is untouched
