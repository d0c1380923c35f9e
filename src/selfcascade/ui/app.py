"""The page of ``selfcascade ui``: gradio components wired to ``selfcascade.ui.runner``.

Imported only when the server starts: gradio takes seconds to import, and ``selfcascade --help`` should not.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import gradio as gr
from PIL import Image

from ..modes import MODES
from .runner import ASPECTS, PIXEL_FACTORS, ModelPool, ModeResult, Request, Stopped, preset_size, resolve_seed, run_modes

CUSTOM = "custom"
PRESETS = {f"{f}x pixels": f for f in PIXEL_FACTORS}
#: Small images (the embedded model's 32 px base) are enlarged in the page; keep their pixels sharp.
CSS = ".pixelated img { image-rendering: pixelated; }"
#: Modes compared on first load: the baseline and the method.
DEFAULT_MODES = ["direct", "tuning-free"]


def error_text(message: object) -> str:
    """The CLI's own ``error: ...`` line, escaped so markdown shows it verbatim."""
    return "error: " + re.sub(r"([\\`*_\[\]<>#|])", r"\\\1", str(message))


def status_text(request: Request, results: list[ModeResult], note: str = "") -> str:
    """A table of the modes done so far: time, stage sizes, file (or the mode's error)."""
    lines = [f"seed **{request.seed}**, {request.height}x{request.width} (HxW), {request.steps} steps", "",
             "| mode | time | stages (WxH) | PNG |", "|---|---|---|---|"]
    for r in results:
        if r.error is not None:
            lines.append(f"| {r.mode} | {r.seconds:.1f} s | {error_text(r.error)} | |")
        else:
            stages = " → ".join(f"{w}x{h}" for h, w in r.stage_sizes)
            lines.append(f"| {r.mode} | {r.seconds:.1f} s | {stages} | {r.path.name} |")
    return "\n".join(lines + ([f"\n{note}"] if note else []))


def labelled_images(results: list[ModeResult]) -> dict[str, str]:
    """Every image of a run by label (each mode's result, then its earlier stages), for the slider."""
    images = {r.mode: str(r.path) for r in results if r.path is not None}
    for r in results:
        for i, path in enumerate(r.stage_paths):
            h, w = r.stage_sizes[i]
            images[f"{r.mode} stage {i} ({w}x{h})"] = str(path)
    return images


def slider_pair(images: dict[str, str], left: str | None, right: str | None) -> tuple[Image.Image, Image.Image] | None:
    """The two chosen images at one size (nearest-neighbour, so a stage's pixels stay visible)."""
    if left not in images or right not in images:
        return None
    pair = [Image.open(images[left]).convert("RGB"), Image.open(images[right]).convert("RGB")]
    size = max((im.size for im in pair), key=lambda s: s[0] * s[1])
    return tuple(im if im.size == size else im.resize(size, Image.NEAREST) for im in pair)


def build(pool: ModelPool, out_dir: Path, model: str = "embedded", concurrency: int = 1) -> gr.Blocks:
    """The page; ``concurrency`` generations run at once across tabs (each model still runs one at a time)."""
    stop_flags: dict[str, threading.Event] = {}

    def fill_size(model: str, preset: str, aspect: str) -> tuple[str, Any, Any]:
        try:
            cascade, _ = pool.get(model)
        except (ValueError, OSError) as exc:
            return error_text(exc), gr.update(), gr.update()
        bb = cascade.backbone
        info = f"{model.strip()}: base {bb.base_size[0]}x{bb.base_size[1]} px, sides a multiple of {bb.size_multiple}"
        if preset == CUSTOM:
            return info, gr.update(), gr.update()
        return (info, *preset_size(bb.base_size, bb.size_multiple, PRESETS[preset], aspect))

    def arm(request: gr.Request) -> None:
        stop_flags.setdefault(request.session_hash, threading.Event()).clear()

    def stop(request: gr.Request) -> str:
        stop_flags.setdefault(request.session_hash, threading.Event()).set()
        return "stopping at the next step..."

    def forget(request: gr.Request) -> None:
        """A closed tab stops its generation, so the tabs queued behind it do not wait for it."""
        flag = stop_flags.pop(request.session_hash, None)
        if flag is not None:
            flag.set()

    def generate(prompt: str, negative: str, model: str, height: int | None, width: int | None, modes: list[str],
                 steps: float, guidance: float | None, k: int | None, seed: int | None, bank: str,
                 history: list[tuple[str, str]], request: gr.Request,
                 progress: gr.Progress = gr.Progress()) -> Iterator[dict]:
        stop_flag = stop_flags.setdefault(request.session_hash, threading.Event())
        try:
            if height is None or width is None:
                raise ValueError("give a height and a width (or pick a size preset).")
            progress(None, desc=f"loading {model}")
            cascade, lock = pool.get(model)
            req = Request(prompt, int(height), int(width), list(modes), resolve_seed(seed),
                          negative_prompt=negative, steps=int(steps), guidance=guidance or None, K=int(k or 0) or None,
                          bank=bank.strip() or None)
        except (ValueError, OSError) as exc:
            yield {status: error_text(exc)}
            return

        def on_step(mode: str, stage: int, sizes: tuple[tuple[int, int], ...], step: int, total: int) -> None:
            progress((step, total), unit="steps",
                     desc=f"{mode} ({req.modes.index(mode) + 1}/{len(req.modes)}), stage {stage + 1}/{len(sizes)} "
                          f"at {sizes[stage][1]}x{sizes[stage][0]}")

        results: list[ModeResult] = []
        try:
            for result in run_modes(cascade, lock, req, out_dir, stop_flag, on_step):
                results.append(result)
                if result.path is not None:
                    h, w = req.height, req.width
                    history = [(str(result.path), f"{result.mode}, {w}x{h}, seed {req.seed}, {result.seconds:.1f} s: "
                                                  f"{req.prompt[:60]}")] + history
                yield outputs(req, results, history)
        except (ValueError, OSError) as exc:  # refused before any mode ran (size, ratio, prompt), or a PNG not written
            yield {status: error_text(exc), last_seed: req.seed}
        except Stopped as stopped:
            yield {**outputs(req, results, history), status: status_text(req, results, f"**stopped** during {stopped}")}

    def outputs(req: Request, results: list[ModeResult], history: list[tuple[str, str]]) -> dict:
        done = [r for r in results if r.path is not None]
        images = labelled_images(results)
        labels = list(images)
        left = done[0].mode if done else None
        right = done[1].mode if len(done) > 1 else next((lbl for lbl in labels if lbl != left), None)
        return {
            status: status_text(req, results, "" if len(results) == len(req.modes) else "running..."),
            gallery: [(str(r.path), f"{r.mode}: {r.seconds:.1f} s") for r in done],
            stages: [(str(p), f"{r.mode} {w}x{h}") for r in done if r.stage_paths
                     for p, (h, w) in zip([*r.stage_paths, r.path], r.stage_sizes)],
            files: [str(p) for r in done for p in (r.path, *r.stage_paths)],
            slider_left: gr.update(choices=labels, value=left), slider_right: gr.update(choices=labels, value=right),
            slider: slider_pair(images, left, right), shown: images,
            history_state: history, history_gallery: history, last_seed: req.seed,
        }

    with gr.Blocks(title="selfcascade") as demo:
        gr.Markdown("## selfcascade: generate above a model's training size, compare the methods side by side")
        with gr.Row():
            with gr.Column(scale=1):
                prompt = gr.Textbox(label="prompt", lines=2, elem_id="prompt", placeholder="red apple")
                negative = gr.Textbox(label="negative prompt", elem_id="negative")
                with gr.Row():
                    run = gr.Button("Generate", variant="primary", elem_id="generate")
                    halt = gr.Button("Stop", variant="stop", elem_id="stop")
                model_box = gr.Dropdown(["embedded"], value=model, allow_custom_value=True, elem_id="model",
                                        label="model: 'embedded', a diffusers folder, or a hub id (online)")
                model_info = gr.Markdown(elem_id="model-info")
                preset = gr.Radio([*PRESETS, CUSTOM], value=next(iter(PRESETS)), label="size", elem_id="preset")
                aspect = gr.Radio(list(ASPECTS), value="1:1", label="aspect (W:H)", elem_id="aspect")
                with gr.Row():
                    height = gr.Number(label="height", precision=0, elem_id="height")
                    width = gr.Number(label="width", precision=0, elem_id="width")
                modes = gr.CheckboxGroup(list(MODES), value=DEFAULT_MODES, label="modes (same seed)", elem_id="modes")
                with gr.Accordion("sampling", open=True):
                    steps = gr.Slider(1, 150, value=50, step=1, label="steps", elem_id="steps")
                    guidance = gr.Number(0, label="guidance (0: the model's)", elem_id="guidance")
                    k = gr.Number(0, precision=0, label="K of 1000 (0: the model's)", elem_id="K")
                    bank = gr.Textbox(label="bank for tuned mode (empty: the model's own)", elem_id="bank")
                    with gr.Row():
                        seed = gr.Number(-1, precision=0, label="seed (-1: random)", elem_id="seed")
                        reuse = gr.Button("reuse last seed", elem_id="reuse-seed")
            with gr.Column(scale=2):
                status = gr.Markdown(elem_id="status")
                gallery = gr.Gallery(label="modes, same seed", columns=4, height=320, format="png", object_fit="contain",
                                     elem_id="results", elem_classes=["pixelated"])
                with gr.Row():
                    slider_left = gr.Dropdown(label="slider: left", elem_id="slider-left")
                    slider_right = gr.Dropdown(label="slider: right", elem_id="slider-right")
                slider = gr.ImageSlider(type="pil", format="png", label="slider", max_height=400, elem_id="slider",
                                        elem_classes=["pixelated"])
                stages = gr.Gallery(label="the cascades' stages", columns=6, height=200, format="png",
                                    object_fit="contain", elem_id="stages", elem_classes=["pixelated"])
                files = gr.File(label="PNGs with their parameters", file_count="multiple", elem_id="files")
                with gr.Accordion("this session", open=False):
                    history_gallery = gr.Gallery(columns=6, height=240, format="png", object_fit="contain",
                                                 elem_id="history", elem_classes=["pixelated"])
        history_state = gr.State([])
        last_seed = gr.State(None)
        shown = gr.State({})

        size_inputs = [model_box, preset, aspect]
        for trigger in (demo.load, model_box.change, preset.change, aspect.change):
            trigger(fill_size, size_inputs, [model_info, height, width])
        for box in (height, width):
            box.input(lambda: CUSTOM, None, preset, queue=False)
        reuse.click(lambda s: gr.update() if s is None else s, last_seed, seed, queue=False)
        for box in (slider_left, slider_right):
            box.input(slider_pair, [shown, slider_left, slider_right], slider, queue=False)
        run.click(arm, None, None, queue=False).then(
            generate, [prompt, negative, model_box, height, width, modes, steps, guidance, k, seed, bank, history_state],
            [status, gallery, stages, files, slider_left, slider_right, slider, shown, history_state, history_gallery,
             last_seed],
            concurrency_limit=concurrency, concurrency_id="generate", show_progress_on=[gallery])
        halt.click(stop, None, status, queue=False)
        demo.unload(forget)
    return demo
