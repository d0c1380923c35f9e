"""Peak memory of `selfcascade evaluate`'s scoring at several --score-batch-size values.

    python benchmarks/bench_scoring_memory.py --size 256 --count 64 --batch-sizes 8 64

Copies ``--count`` eval-split emoji renders at ``--size`` px into a "generated" folder and the next ``--count``
into a "real" folder, then, per batch size, runs ``evaluate --generated G --real R --features emoji`` in a fresh
Python process and reports that process's peak resident set size (``ru_maxrss``): the scoring of one set against
another, plus the fixed cost of Python, torch and the feature network (measured alone as the ``import`` row).
"""

from __future__ import annotations

import argparse
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from selfcascade.data.emoji import default_cache_dir, image_path, read_manifest

CHILD = """
import resource, sys
from selfcascade.cli import main
from selfcascade.metrics import load_features
load_features("emoji")
if sys.argv[1:]:
    assert main(sys.argv[1:]) == 0
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
"""


def peak_rss_mib(argv: list[str]) -> tuple[float, float]:
    """Peak RSS (MiB) and wall seconds of a fresh process running the CLI with ``argv`` (none: imports only)."""
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", CHILD, *argv], capture_output=True, text=True, check=True)
    return int(done.stdout.split()[-1]) / 1024, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=256, help="side of the renders (one the data cache holds)")
    parser.add_argument("--count", type=int, default=64, help="images per set")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[8, 64])
    args = parser.parse_args()
    cache = default_cache_dir()
    renders = [r for r in read_manifest(cache) if r["split"] == "eval"][:2 * args.count]
    with tempfile.TemporaryDirectory() as tmp:
        folders = {"generated": Path(tmp) / "generated", "real": Path(tmp) / "real"}
        for i, record in enumerate(renders):
            folder = folders["generated" if i < args.count else "real"]
            folder.mkdir(exist_ok=True)
            shutil.copy(image_path(cache, args.size, record["id"]), folder / f"{i:05d}.png")
        rss, seconds = peak_rss_mib([])
        print(f"| import | {rss:.0f} | {seconds:.1f} |")
        for batch in args.batch_sizes:
            rss, seconds = peak_rss_mib([
                "evaluate", "--generated", str(folders["generated"]), "--real", str(folders["real"]),
                "--num-real", str(args.count), "--base-size", str(args.size // 4), "--features", "emoji",
                "--score-batch-size", str(batch), "--out", str(Path(tmp) / f"out-{batch}")])
            print(f"| {batch} | {rss:.0f} | {seconds:.1f} |", flush=True)
    print(f"({args.count} images per set at {args.size} px; RUSAGE_SELF of each process, {resource.getpagesize()} B pages)")


if __name__ == "__main__":
    main()
