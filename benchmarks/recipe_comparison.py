"""Which training recipe for the v3 UNet? Short runs from scratch, one change each, scored side by side.

Each variant trains `selfcascade train-sd` from scratch for the same steps, batch and data (the train split at
128 px plus the zoomed windows), changing one thing from the shipped recipe (epsilon prediction, min-SNR 5,
EMA 0.999, caption dropout 0.1, lr 3e-4). EMA and caption dropout are not varied: at a few hundred steps the
EMA's warm-up keeps it close to the raw weights, and guidance needs the dropout. Every run resumes from its own checkpoint, so an interrupted comparison
continues where it stopped. Then ``prompt_adherence.py`` scores all of them in one run (concept top-5, style,
FID vs the renders).

    python benchmarks/recipe_comparison.py --steps 600 --latents runs/sd/latents.safetensors

Short runs rank how fast a recipe learns, not where it ends up: read the table as that.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

from selfcascade.data.emoji import slug

RESULTS = Path(__file__).resolve().parent / "results" / "v3"
VARIANTS: dict[str, list[str]] = {
    "shipped": [],
    "v-prediction": ["--prediction-type", "v_prediction"],
    "no min-SNR": ["--min-snr-gamma", "0"],
    "lr 1e-4": ["--lr", "1e-4"],
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--vae", default="src/selfcascade/embedded_v3/vae")
    parser.add_argument("--latents", type=Path, default=None,
                        help="an encoded data cache of another train-sd run with the same data settings "
                             "(RUN/latents.safetensors), linked into each run instead of encoding again")
    parser.add_argument("--runs", type=Path, default=Path("runs/recipes"))
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--count", type=int, default=96, help="captions per split for the scoring")
    parser.add_argument("--output", type=Path, default=RESULTS / "recipe_comparison")
    args = parser.parse_args()

    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    models = []
    for name in args.variants:
        run_dir = args.runs / slug(name)
        export = run_dir / "export"
        run_dir.mkdir(parents=True, exist_ok=True)
        if args.latents is not None and not (run_dir / "latents.safetensors").exists():
            os.link(args.latents, run_dir / "latents.safetensors")
        if not (export / "model_index.json").exists():
            subprocess.run([sys.executable, "-m", "selfcascade", "train-sd", "--vae", args.vae, "--run-dir",
                            str(run_dir), "--max-steps", str(args.steps), "--batch-size", str(args.batch_size),
                            "--threads", str(args.threads), "--log-every", "50", "--checkpoint-every", "100",
                            "--export", str(export), *VARIANTS[name]], check=True, env=env)
        models += ["--model", f"{name}={export}"]
    subprocess.run([sys.executable, str(Path(__file__).with_name("prompt_adherence.py")), *models,
                    "--count", str(args.count), "--threads", str(args.threads), "--output", str(args.output)],
                   check=True, env=env)


if __name__ == "__main__":
    main()
