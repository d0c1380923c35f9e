"""``selfcascade`` command line, run in-process through ``selfcascade.cli.main``.

``generate`` loads the tiny SD pipeline saved with ``save_pretrained`` (the ``tiny_sd_dir`` fixture):
the save_pretrained -> from_pretrained round trip through the CLI.
"""

from __future__ import annotations

import argparse
import json
import logging
import re

import numpy as np
import pytest
from PIL import Image

from selfcascade import SelfCascadePipeline
from selfcascade.cli import build_parser, main

PROMPT = "a red apple"


def _generate(model_dir, *extra: str) -> int:
    return main(["generate", PROMPT, "--model", str(model_dir), "--steps", "2", "--device", "cpu", "--no-progress",
                 *extra])


def _png_parameters(path) -> str:
    with Image.open(path) as image:
        image.load()
        return image.text["parameters"]


# ------------------------------------------------------------------------------------ plan
def test_plan_prints_every_stage(capsys):
    assert main(["plan", "--base", "512", "--height", "3072", "--width", "1536"]) == 0
    out = capsys.readouterr().out
    stages = re.findall(r"stage (\d+):\s+(\d+) x (\d+)", out)
    assert [s[0] for s in stages] == ["0", "1", "2", "3"]
    assert stages[-1][1:] == ("3072", "1536")
    assert all(int(h) % 64 == 0 and int(w) % 64 == 0 for _, h, w in stages)
    assert "base 512x512 -> target 3072x1536" in out and "4 stage(s)" in out


def test_plan_bad_size_exits_2_with_the_fix(capsys):
    assert main(["plan", "--base", "512", "--height", "1000", "--width", "512"]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert "not a multiple of 64" in captured.err and "use 960 or 1024" in captured.err


# -------------------------------------------------------------------------------- generate
def test_generate_writes_target_and_stages_with_parameters(tiny_sd_dir, tmp_path, capsys):
    out = tmp_path / "out.png"
    assert _generate(tiny_sd_dir, "--height", "128", "--width", "128", "--seeds", "0", "--save-stages",
                     "-o", str(out)) == 0
    printed = capsys.readouterr().out.split()
    expected = {out: (128, 128), tmp_path / "out-stage0.png": (32, 32), tmp_path / "out-stage1.png": (64, 64)}
    assert sorted(printed) == sorted(str(p) for p in expected)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out-stage0.png", "out-stage1.png", "out.png"]  # no temp files left
    for path, size in expected.items():
        with Image.open(path) as image:
            assert image.size == size and image.mode == "RGB"
            assert np.asarray(image).std() > 1.0  # not a flat image
        parameters = _png_parameters(path)
        assert parameters.startswith(PROMPT + "\n")
        for field in ("Seed: 0", "Mode: tuning-free", "Steps: 2", "Size: 128x128", "K: 700", "CFG scale: 7.5",
                      "Sampler: DDIMScheduler", "Stages: 32x32 -> 64x64 -> 128x128"):
            assert field in parameters, field
        with Image.open(path) as image:
            settings = json.loads(image.text["selfcascade"])
        assert settings["seed"] == 0 and settings["stages"] == [[32, 32], [64, 64], [128, 128]]


def test_generate_several_seeds_writes_one_file_each(tiny_sd_dir, tiny_sd, tmp_path, capsys):
    out = tmp_path / "out.png"
    assert _generate(tiny_sd_dir, "--height", "64", "--width", "64", "--seeds", "0-1", "-o", str(out)) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out-0.png", "out-1.png"]
    assert capsys.readouterr().out.split() == [str(tmp_path / "out-0.png"), str(tmp_path / "out-1.png")]
    assert "Seed: 1" in _png_parameters(tmp_path / "out-1.png")
    # the file for seed 1 is the image the Python API gives for seed 1 alone (up to 1/255 of batch round-off)
    with Image.open(tmp_path / "out-1.png") as image:
        from_cli = np.asarray(image).astype(int)
    alone = SelfCascadePipeline.from_pipe(tiny_sd)(PROMPT, 64, 64, seed=1, num_inference_steps=2, progress=False)
    assert np.abs(from_cli - np.asarray(alone.images[0]).astype(int)).max() <= 1
    with Image.open(tmp_path / "out-0.png") as image:
        assert np.abs(np.asarray(image).astype(int) - from_cli).max() > 2


def test_dry_run_writes_nothing_and_prints_the_plan(tiny_sd_dir, tmp_path, capsys):
    out = tmp_path / "sub" / "out.png"
    assert _generate(tiny_sd_dir, "--height", "128", "--width", "64", "--seed", "3", "--K", "500", "--guidance", "7.5,5,3",
                     "--dry-run",
                     "-o", str(out)) == 0
    assert list(tmp_path.iterdir()) == []
    text = capsys.readouterr().out
    settings = json.loads(text[: text.index("scale plan")])
    assert settings["seeds"] == [3] and settings["K"] == 500 and settings["mode"] == "tuning-free"
    assert settings["guidance"] == [7.5, 5.0, 3.0]  # one per stage
    assert (settings["height"], settings["width"], settings["device"], settings["dtype"]) == (128, 64, "cpu", "float32")
    assert settings["outputs"] == [str(out)]
    assert "stage 0:" in text and "stage 2:   128 x 64" in text


@pytest.mark.parametrize(
    "args,fix",
    [
        (["--height", "129", "--width", "128"], "use 128 or 130"),
        (["--height", "16", "--width", "16"], "--mode direct"),
        (["--height", "1024", "--width", "1024"], "--max-ratio"),
        (["--height", "64", "--width", "64", "--steps", "0"], "num_inference_steps must be a positive integer"),
        (["--height", "64", "--width", "64", "--K", "2000"], r"K must be an integer in [1, 1000]"),
    ],
)
def test_generate_bad_input_exits_2_naming_the_fix(tiny_sd_dir, tmp_path, capsys, args, fix):
    assert _generate(tiny_sd_dir, *args, "-o", str(tmp_path / "out.png")) == 2
    captured = capsys.readouterr()
    last = captured.err.strip().splitlines()[-1]  # (diffusers' loader may draw its own bar above it)
    assert last.startswith("error: ") and fix in last
    assert "Traceback" not in captured.err
    assert list(tmp_path.iterdir()) == []


def test_generate_folder_without_model_index_exits_2(tmp_path, capsys):
    assert main(["generate", PROMPT, "--model", str(tmp_path), "--device", "cpu", "--dry-run"]) == 2
    assert "model_index.json" in capsys.readouterr().err


# ------------------------------------------------------------------------------------ help
def _generate_parser() -> argparse.ArgumentParser:
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices["generate"]


def test_generate_help_explains_every_option(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["generate", "--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    # the options issue 2 asks for
    for option in ("--height", "--width", "--model", "--mode", "--steps", "--guidance", "--K", "--noise-level",
                   "--seeds", "--save-stages", "--output", "--negative-prompt", "--pivot-space", "--device",
                   "--dtype", "--dry-run", "tuning-free", "direct"):
        assert option in text, option
    # and every option the parser has, each with its own line of help
    for action in _generate_parser()._actions:
        for option in action.option_strings:
            assert option in text, option
        assert action.help, action.dest


def test_transformers_notice_about_torchvision_is_dropped_and_nothing_else():
    logger = logging.getLogger("transformers.utils.import_utils")

    def record(message: str) -> logging.LogRecord:
        return logging.LogRecord(logger.name, logging.WARNING, __file__, 0, message, None, None)

    assert not logger.filter(record("`CLIPImageProcessor` requires torchvision (not installed); falling back"))
    assert logger.filter(record("Could not import module 'X'"))


# ------------------------------------------------------------------------------------ fast help, plugins
def test_help_imports_neither_torch_nor_diffusers():
    import subprocess
    import sys

    code = ("import sys\nfrom selfcascade.cli import main\nfor argv in (['--help'], ['generate', '--help']):\n"
            "    try:\n        main(argv)\n    except SystemExit:\n        pass\n"
            "print(sorted(m for m in ('torch', 'diffusers') if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1] == "[]"
    assert "train-upsamplers" in done.stdout and "--batch-size" in done.stdout


def test_help_states_each_default_once():
    text = _generate_parser().format_help()
    assert "(default: None)" not in text and "(default: False)" not in text
    assert "base height) (default" not in " ".join(text.split())
    assert "(default: 50)" in text  # a default the help text does not state is still shown


def test_plugin_command_lines_match_what_their_modules_register():
    from selfcascade.cli import _IMPORT_ERRORS, COMMANDS, PLUGIN_COMMANDS

    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    registered = {action.dest: action.help for action in sub._choices_actions if action.dest not in COMMANDS}
    loaded = {name: line for name, (module, line) in PLUGIN_COMMANDS.items() if module not in _IMPORT_ERRORS}
    assert registered == {**loaded, **{n: PLUGIN_COMMANDS[n][1] for n in PLUGIN_COMMANDS if n not in loaded}}


def test_scheduler_names_and_batch_size_reach_the_call(tiny_sd_dir, tmp_path, capsys):
    assert _generate(tiny_sd_dir, "--scheduler", "DPM++ 2M Karras", "--batch-size", "2", "--seeds", "0-2",
                     "--dry-run", "-o", str(tmp_path / "a.png")) == 0
    settings = json.loads(capsys.readouterr().out.split("\nscale plan")[0])
    assert settings["scheduler"] == "DPMSolverMultistepScheduler" and settings["batch_size"] == 2


# ------------------------------------------------------------------------------------ loading what users have
def _tiny_lora(folder):
    """A random LoRA on the tiny SD UNet's attention, saved as diffusers' load_lora_weights reads it."""
    import torch
    from diffusers import StableDiffusionPipeline
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    from selfcascade.testing import make_tiny_sd

    unet = make_tiny_sd().unet
    torch.manual_seed(1)
    unet.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v", "to_out.0"],
                                init_lora_weights=False))
    layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(unet))
    StableDiffusionPipeline.save_lora_weights(folder, unet_lora_layers=layers, safe_serialization=True)
    return folder / "pytorch_lora_weights.safetensors"


def test_lora_file_at_a_scale_and_a_replacement_vae(tiny_sd_dir, tmp_path):
    pytest.importorskip("peft")
    from selfcascade.testing import make_tiny_sd

    lora = _tiny_lora(tmp_path / "lora")
    outputs = {}
    for name, extra in (("plain", []), ("zero", ["--lora", f"{lora}:0"]), ("full", ["--lora", str(lora)]),
                        ("vae", ["--vae", str(tmp_path / "vae")])):
        if name == "vae":
            make_tiny_sd(seed=3).vae.save_pretrained(tmp_path / "vae")
        assert _generate(tiny_sd_dir, *extra, "-o", str(tmp_path / f"{name}.png")) == 0
        outputs[name] = np.asarray(Image.open(tmp_path / f"{name}.png"), dtype=np.int16)
    assert np.array_equal(outputs["zero"], outputs["plain"])  # scale 0: the LoRA adds nothing
    assert np.abs(outputs["full"] - outputs["plain"]).max() > 2
    assert np.abs(outputs["vae"] - outputs["plain"]).max() > 2


def test_config_is_for_single_file_checkpoints_only(tiny_sd_dir, tmp_path, capsys):
    assert _generate(tiny_sd_dir, "--config", str(tiny_sd_dir), "-o", str(tmp_path / "a.png")) == 2
    assert "single-file checkpoint" in capsys.readouterr().err
