"""Peak memory of upsampler-bank training per memory option, on the tiny models, with estimates for real ones.

    python benchmarks/bench_training_memory.py                     # tiny SD and tiny SDXL, every setting
    python benchmarks/bench_training_memory.py --size 128 --batch-size 4 --steps 2

Each (model, setting) runs ``selfcascade train-upsamplers``' own ``train()`` (options parsed by its own CLI parser:
``--gradient-checkpointing``, ``--grad-accum``, ``--encode-batch``, ``--mixed-precision``) for a few steps, pivot
cache fill included, in a fresh child process so no setting inherits another's allocator state. Measured:

- CUDA: ``torch.cuda.max_memory_allocated()`` during ``train()`` minus ``memory_allocated()`` before it (exact
  live tensor bytes; allocator reserve not counted).
- CPU: the rise of the child's peak resident set (VmHWM, reset through /proc/self/clear_refs) over its resident set
  just before ``train()``. The child runs with ``MALLOC_MMAP_THRESHOLD_=65536`` so glibc maps every block of 64 KiB
  or more on its own and unmaps it when freed: the resident set follows live tensors instead of keeping freed
  blocks, and the number is close to peak live bytes (plus small allocations and library buffers).

Both include the frozen weights ``train()`` loads (the "weights" column: parameter count x bytes); "activations" is
the peak minus them. Estimates for SD 2.1 at 1024 px and SDXL at 2048 px (batch 1, fp16) are labelled as such:

    estimate = W_real + A_tiny x V_real / V_tiny

W_real: bytes of the real UNet, VAE and text encoders in fp16, counted on the ``meta`` device from their published
configs (no weights). A_tiny: the measured activation bytes of the same setting on the tiny model of the same
family. V: bytes of every leaf module's output in one UNet forward at the training size and batch (counted on
``meta``), i.e. the feature-map volume that autograd keeps; attention score matrices are left out, as CUDA's
fused SDPA kernels never store them. The assumption is that activation memory grows with that volume; it ignores
the VAE encoding of pivots (tiled above 1024 px, batched by ``--encode-batch``) and allocator slack.
Results go to benchmarks/results/training_memory_tiny.{md,csv}.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from bench_inference import RESULTS, PeakMemory, device_name, write_results

#: (name, train-upsamplers options); "{half}" is half the batch size (grad-accum keeps the effective batch).
SETTINGS: list[tuple[str, list[str]]] = [
    ("plain", []),
    ("gradient-checkpointing", ["--gradient-checkpointing"]),
    ("grad-accum 2 (half batch)", ["--grad-accum", "2", "--batch-size", "{half}"]),
    ("encode-batch 1", ["--encode-batch", "1"]),
    ("checkpointing + grad-accum 2", ["--gradient-checkpointing", "--grad-accum", "2", "--batch-size", "{half}"]),
]
MODELS = ("tiny-sd", "tiny-sdxl")
#: Settings that change activations per image, and so get an estimate at batch 1. Grad-accum and encode-batch
#: change how many images are in flight, which at batch 1 is already the least.
ESTIMATED = ("plain", "gradient-checkpointing")
#: The real model each tiny family stands for in the estimates: (name, high-res side in px).
REAL = {"tiny-sd": ("SD 2.1", 1024), "tiny-sdxl": ("SDXL", 2048)}


def precisions(device: torch.device) -> list[str]:
    """Mixed-precision modes this device trains in: fp32 always, bf16 where supported, fp16 on CUDA."""
    if device.type == "cuda":
        return ["no", "fp16"] + (["bf16"] if torch.cuda.is_bf16_supported() else [])
    return ["no", "bf16"]


# --------------------------------------------------------------------------------------------------
# Counting on the meta device (no weights, no memory)


def _sd21_components() -> dict[str, torch.nn.Module]:
    """SD 2.1's UNet, VAE and OpenCLIP-H text encoder as published in its config.json files."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    with torch.device("meta"):
        return {
            "unet": UNet2DConditionModel(
                sample_size=96, block_out_channels=(320, 640, 1280, 1280), layers_per_block=2,
                down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
                attention_head_dim=(5, 10, 20, 20), cross_attention_dim=1024, use_linear_projection=True),
            "vae": _sd_vae(AutoencoderKL),
            "text_encoder": CLIPTextModel(CLIPTextConfig(
                vocab_size=49408, hidden_size=1024, intermediate_size=4096, num_hidden_layers=23,
                num_attention_heads=16, max_position_embeddings=77, hidden_act="gelu")),
        }


def _sdxl_components() -> dict[str, torch.nn.Module]:
    """SDXL base 1.0's UNet, VAE, CLIP ViT-L and OpenCLIP bigG text encoders as published in its config.json files."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    with torch.device("meta"):
        return {
            "unet": UNet2DConditionModel(
                sample_size=128, block_out_channels=(320, 640, 1280), layers_per_block=2,
                down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                attention_head_dim=(5, 10, 20), transformer_layers_per_block=(1, 2, 10), cross_attention_dim=2048,
                use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=256,
                projection_class_embeddings_input_dim=2816),
            "vae": _sd_vae(AutoencoderKL),
            "text_encoder": CLIPTextModel(CLIPTextConfig(
                vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu")),
            "text_encoder_2": CLIPTextModelWithProjection(CLIPTextConfig(
                vocab_size=49408, hidden_size=1280, intermediate_size=5120, num_hidden_layers=32,
                num_attention_heads=20, max_position_embeddings=77, hidden_act="gelu", projection_dim=1280)),
        }


def _sd_vae(cls) -> torch.nn.Module:
    return cls(block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4,
               down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4)


def parameter_bytes(modules: dict[str, torch.nn.Module], bytes_per_parameter: int) -> int:
    return sum(p.numel() for m in modules.values() for p in m.parameters()) * bytes_per_parameter


def feature_volume(unet: torch.nn.Module, side: int, batch: int, dtype: torch.dtype) -> int:
    """Bytes of every leaf module's output in one forward of ``unet`` on ``side`` x ``side`` latents (on meta)."""
    unet = unet.to(device="meta", dtype=dtype)
    total = 0

    def count(module: torch.nn.Module, args: tuple, output) -> None:
        nonlocal total
        if isinstance(output, torch.Tensor):
            total += output.numel() * output.element_size()

    handles = [m.register_forward_hook(count) for m in unet.modules() if not list(m.children())]
    with torch.device("meta"):
        added = None
        if unet.config.addition_embed_type == "text_time":
            pooled = unet.config.projection_class_embeddings_input_dim - 6 * unet.config.addition_time_embed_dim
            added = {"text_embeds": torch.zeros(batch, pooled, dtype=dtype), "time_ids": torch.zeros(batch, 6)}
        unet(torch.zeros(batch, 4, side, side, dtype=dtype), torch.full((batch,), 500),
             encoder_hidden_states=torch.zeros(batch, 77, unet.config.cross_attention_dim, dtype=dtype),
             added_cond_kwargs=added)
    for handle in handles:
        handle.remove()
    return total


# --------------------------------------------------------------------------------------------------
# One measurement (child process)


def _tiny_pipe(model: str):
    from selfcascade.testing import make_tiny_sd, make_tiny_sdxl

    return make_tiny_sd(seed=0) if model == "tiny-sd" else make_tiny_sdxl(seed=0)


def measure(model_dir: Path, model: str, options: list[str], size: int, images: int, steps: int) -> dict:
    """Peak memory of ``train()`` with ``options``, in this process (run it in a fresh one)."""
    from selfcascade.train_upsamplers import ImageCaptions, add_arguments, train

    torch.set_num_threads(1)
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    with tempfile.TemporaryDirectory() as run_dir:
        args = parser.parse_args(["--model", str(model_dir), "--size", str(size), "--max-steps", str(steps),
                                  "--checkpoint-every", "1000000", "--validate-every", "0", "--threads", "1",
                                  "--run-dir", run_dir, *options])
        gen = torch.Generator().manual_seed(0)
        data = ImageCaptions(torch.randint(0, 256, (images, 3, size, size), generator=gen, dtype=torch.uint8),
                             [f"red apple {i}" for i in range(images)])
        device = torch.device("cpu" if args.cpu or not torch.cuda.is_available() else "cuda")
        with PeakMemory(device) as peak:
            train(args, data)
    pipe = _tiny_pipe(model)
    modules = {name: getattr(pipe, name) for name in ("unet", "vae", "text_encoder", "text_encoder_2")
               if getattr(pipe, name, None) is not None}
    bytes_per = 4 if (args.mixed_precision or ("no" if device.type == "cpu" else "fp16")) == "no" else 2
    return {"peak_mib": peak.mib, "weights_mib": parameter_bytes(modules, bytes_per) / 2**20,
            "dtype_bytes": bytes_per, "device": str(device)}


# --------------------------------------------------------------------------------------------------
# The run (parent)


def _child(model_dir: Path, model: str, options: list[str], args: argparse.Namespace) -> dict:
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "OMP_NUM_THREADS": "1"}
    request = json.dumps({"model_dir": str(model_dir), "model": model, "options": options, "size": args.size,
                          "images": args.images, "steps": args.steps})
    out = subprocess.run([sys.executable, __file__, "--child", request], env=env, capture_output=True, text=True,
                         cwd=Path(__file__).parent)
    if out.returncode != 0:
        raise RuntimeError(f"{model} {options} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def run(args: argparse.Namespace) -> tuple[list[dict], list[dict]]:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    rows, estimates = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for model in args.models:
            model_dir = Path(tmp) / model
            _tiny_pipe(model).save_pretrained(model_dir, safe_serialization=True)
            default = "no" if device.type == "cpu" else "fp16"
            settings = [(name, opts, default) for name, opts in SETTINGS]
            settings += [(f"{p} weights + autocast", [], p) for p in precisions(device) if p != default]
            for name, options, precision in settings:
                options = [o.replace("{half}", str(max(1, args.batch_size // 2))) for o in options]
                if "--batch-size" not in options:
                    options = options + ["--batch-size", str(args.batch_size)]
                options = options + ["--mixed-precision", precision]
                result = _child(model_dir, model, options, args)
                micro = int(options[options.index("--batch-size") + 1])
                row = {"kind": "measured", "model": model, "setting": name,
                       "precision": {"no": "fp32"}.get(precision, precision),
                       "micro_batch": micro, "options": " ".join(options), **result,
                       "activations_mib": result["peak_mib"] - result["weights_mib"]}
                rows.append(row)
                print(f"{model:9s} {name:32s} peak {row['peak_mib']:8.1f} MiB  (weights {row['weights_mib']:.1f})",
                      flush=True)
            estimates += estimate(model, [r for r in rows if r["model"] == model], args)
    return rows, estimates


def estimate(model: str, rows: list[dict], args: argparse.Namespace) -> list[dict]:
    """The formula in the module docstring, from this family's ``ESTIMATED`` rows at the device's default precision
    (fp32 on CPU, fp16 on CUDA): CPU bf16 autocast keeps many activations in fp32, unlike fp16 on a GPU."""
    from diffusers.utils import logging as diffusers_logging

    diffusers_logging.set_verbosity_error()  # casting meta modules to fp16 warns about fp32-kept modules; none here
    real_name, real_px = REAL[model]
    components = _sd21_components() if model == "tiny-sd" else _sdxl_components()
    weights = parameter_bytes(components, 2)
    volume_real = feature_volume(components["unet"], real_px // 8, 1, torch.float16)  # SD's VAE: 8x per side
    out = []
    for row in rows:
        if row["setting"] not in ESTIMATED or row["precision"] != ("fp32" if row["device"] == "cpu" else "fp16"):
            continue
        dtype = torch.float32 if row["dtype_bytes"] == 4 else torch.float16
        tiny = _tiny_pipe(model)
        volume_tiny = feature_volume(tiny.unet, args.size // tiny.vae_scale_factor, row["micro_batch"], dtype)
        activations = row["activations_mib"] * 2**20 * volume_real / volume_tiny
        out.append({"kind": "estimate", "model": real_name, "size_px": real_px, "from_tiny_setting": row["setting"],
                    "from_tiny_precision": row["precision"], "weights_gib": weights / 2**30,
                    "activations_gib": activations / 2**30, "estimate_gib": (weights + activations) / 2**30,
                    "volume_ratio": volume_real / volume_tiny})
    return out


def write(rows: list[dict], estimates: list[dict], args: argparse.Namespace) -> None:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    measured = ("torch.cuda.max_memory_allocated() rise during train()" if device.type == "cuda" else
                "rise of the child process's peak resident set (VmHWM) during train(), glibc mmap threshold 64 KiB")
    lines = [
        "# Training memory: upsampler-bank tuning per memory option (tiny models)", "",
        f"Device: {device_name(1)}; torch {torch.__version__}; `train-upsamplers`' `train()` for {args.steps} steps at "
        f"{args.size} px (pivots at half the side), {args.images} random images, each setting in a fresh process. "
        f"Measured: {measured}; it includes the pivot cache fill and the frozen weights. Command: "
        f"`python benchmarks/bench_training_memory.py --size {args.size} --batch-size {args.batch_size} "
        f"--steps {args.steps} --images {args.images}`.", "",
        "| model | setting | precision | micro-batch | peak MiB | weights MiB | activations MiB |",
        "|---|---|---|---|---|---|---|",
    ]
    lines += [f"| {r['model']} | {r['setting']} | {r['precision']} | {r['micro_batch']} | {r['peak_mib']:.1f} | "
              f"{r['weights_mib']:.1f} | {r['activations_mib']:.1f} |" for r in rows]
    lines += [
        "", "## Estimates (not measured): SD 2.1 at 1024 px and SDXL at 2048 px, batch 1, fp16 weights", "",
        "estimate = W_real + A_tiny x V_real / V_tiny, where W_real is the real UNet + VAE + text encoders' parameter "
        "count x 2 bytes (counted on the meta device from the published configs), A_tiny the measured activations of "
        "the tiny row, and V the bytes of every leaf module's output in one UNet forward (meta device; attention "
        "scores excluded, as fused SDPA never stores them), at each run's size, micro-batch and dtype. It assumes "
        "activations grow with that feature-map volume, and leaves out the VAE encoding of pivots and allocator "
        "slack; a tiny measurement on CPU (no fused attention backward) overstates the attention part. "
        "Grad-accum and encode-batch change how many images are in flight, not memory per image, so at batch 1 "
        "they add nothing to these figures.", "",
        "| model | size | from tiny setting | tiny precision | weights GiB | activations GiB | estimate GiB |",
        "|---|---|---|---|---|---|---|",
    ]
    lines += [f"| {e['model']} | {e['size_px']} | {e['from_tiny_setting']} | {e['from_tiny_precision']} | "
              f"{e['weights_gib']:.2f} | {e['activations_gib']:.1f} | {e['estimate_gib']:.1f} |" for e in estimates]
    write_results(RESULTS / "training_memory_tiny", rows + estimates, lines)  # csv: "kind" tells them apart


def main() -> None:
    if len(sys.argv) == 3 and sys.argv[1] == "--child":
        request = json.loads(sys.argv[2])
        print(json.dumps(measure(Path(request["model_dir"]), request["model"], request["options"], request["size"],
                                 request["images"], request["steps"])))
        return
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", choices=MODELS, default=list(MODELS))
    parser.add_argument("--size", type=int, default=128, help="high-res side in px (tiny base: 32 px)")
    parser.add_argument("--batch-size", type=int, default=4,
                        help="images per step (grad-accum rows: half per micro-batch)")
    parser.add_argument("--images", type=int, default=8, help="training images (all go through the pivot cache)")
    parser.add_argument("--steps", type=int, default=2, help="optimizer steps per setting")
    args = parser.parse_args()
    rows, estimates = run(args)
    write(rows, estimates, args)


if __name__ == "__main__":
    main()
