"""Staging helpers for the GPU run (DEVELOPERS.md): pack what travels here, unpack it on the device, count sizes.

    python scripts/device/stage.py pack-encoder .gpu-run/minilm        # here: MiniLM as fp16 + xz (~39 MiB)
    python scripts/device/stage.py unpack-encoder .gpu-run/minilm DIR  # device: back to an fp32 model folder
    python scripts/device/stage.py slim-packages .gpu-run/packages     # here: the emoji tarballs, read members only
    python scripts/device/stage.py sizes --call NAME=PATH,PATH ...    # here: what each device call would send
    python scripts/device/stage.py copy-tree DEST --carry PATH ...     # here: a copy of what a call sends (dry run)

``--without-from scripts/device/hide.txt`` (sizes, copy-tree) leaves out what ``slim.sh hide`` takes out.

The device lent here takes at most 64 MiB per call: the tracked and untracked-not-ignored files of the
checkout plus the carried paths. MiniLM's fp32 weights alone are 87 MiB, so they travel rounded to fp16
(caption states move by 0.09% on average, at most 1.5% at one token, on 201 captions of the data set) and
xz-compressed; on the device they are written back as an fp32 folder that ``$SELFCASCADE_TEXT_ENCODER`` names.
"""

from __future__ import annotations

import argparse
import lzma
import shutil
import subprocess
import sys
from pathlib import Path

MIB = 2**20
LIMIT_MIB = 64
WEIGHTS = "model.safetensors"
PACKED_WEIGHTS = WEIGHTS + ".xz"


def pack_encoder(dest: Path) -> None:
    """The installed MiniLM's files, its weights as fp16 (integer buffers kept) in ``model.safetensors.xz``."""
    from safetensors.torch import load_file, save

    from selfcascade.text_encoder import _model_path

    source = Path(_model_path())
    tmp = _fresh(dest)
    for path in source.iterdir():  # config, tokenizer files; sub-folders are sentence-transformers' own
        if path.is_file() and path.name != WEIGHTS:
            shutil.copy2(path, tmp / path.name)
    weights = {k: v.half() if v.is_floating_point() else v for k, v in load_file(str(source / WEIGHTS)).items()}
    data = save({k: v.contiguous() for k, v in weights.items()}, metadata={"format": "pt"})
    (tmp / PACKED_WEIGHTS).write_bytes(lzma.compress(data, preset=6))
    _swap(tmp, dest)


def unpack_encoder(packed: Path, dest: Path) -> None:
    """``pack_encoder``'s folder back to a loadable MiniLM folder with fp32 weights."""
    import torch
    from safetensors.torch import load, save_file

    tmp = _fresh(dest)
    for path in packed.iterdir():
        if path.is_file() and path.name != PACKED_WEIGHTS:
            shutil.copy2(path, tmp / path.name)
    weights = load(lzma.decompress((packed / PACKED_WEIGHTS).read_bytes()))
    save_file({k: v.to(torch.float32) if v.is_floating_point() else v for k, v in weights.items()},
              str(tmp / WEIGHTS), metadata={"format": "pt"})
    _swap(tmp, dest)


def slim_packages(dest: Path) -> None:
    from selfcascade.data.emoji import default_cache_dir, slim_packages as slim

    tmp = _fresh(dest)
    slim(default_cache_dir() / "packages", tmp)
    _swap(tmp, dest)


def _fresh(dest: Path) -> Path:
    tmp = dest.with_name(dest.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    return tmp


def _swap(tmp: Path, dest: Path) -> None:
    shutil.rmtree(dest, ignore_errors=True)
    tmp.rename(dest)


def read_list(path: Path | None) -> list[str]:
    """Paths listed one a line (blank lines and # comments skipped)."""
    if path is None:
        return []
    lines = (line.split("#", 1)[0].strip() for line in path.read_text().splitlines())
    return [line.strip("/") for line in lines if line]


def tree_files(repo: Path, without: list[str] = ()) -> list[Path]:
    """The files a device call sends from ``repo`` besides its carry: tracked and untracked-not-ignored ones,
    less those under ``without``."""
    out = subprocess.run(["git", "-C", str(repo), "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                         capture_output=True, check=True).stdout
    names = [n for n in dict.fromkeys(out.decode().split("\0"))
             if n and not any(n == w or n.startswith(w + "/") for w in without)]
    return [repo / n for n in names if (repo / n).is_file() and not (repo / n).is_symlink()]


def copy_tree(repo: Path, dest: Path, carry: list[str], without: list[str]) -> None:
    """What a device call would see: the tree that travels and the carried paths, copied into ``dest``."""
    for path in [*tree_files(repo, without), *(f for c in carry for f in _files(repo / c))]:
        target = dest / path.relative_to(repo)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(path, target)


def _files(path: Path) -> list[Path]:
    if path.is_file():
        return [path]
    return [f for f in sorted(path.rglob("*")) if f.is_file() and not f.is_symlink()]


def sizes(repo: Path, calls: list[str], top: int, without: list[str]) -> int:
    """Print the tree's size, its largest folders and each call's total; 1 if a call is over the limit."""
    files = tree_files(repo, without)
    tree = sum(f.stat().st_size for f in files)
    groups: dict[str, int] = {}
    for f in files:
        parts = f.relative_to(repo).parts
        key = "/".join(parts[:3]) if len(parts) > 3 else "/".join(parts[:-1]) or parts[0]
        groups[key] = groups.get(key, 0) + f.stat().st_size
    print(f"working tree that travels with every call{' after slim.sh hide' if without else ''}: "
          f"{tree / MIB:.1f} MiB ({len(files)} files); largest folders:")
    for key, size in sorted(groups.items(), key=lambda kv: -kv[1])[:top]:
        print(f"  {size / MIB:6.1f} MiB  {key}")
    over = 0
    for call in calls:
        name, _, paths = call.partition("=")
        carry = [p for p in paths.split(",") if p]
        carried = {p: sum(f.stat().st_size for f in _files(repo / p)) for p in carry}
        total = tree + sum(carried.values())
        verdict = "ok" if total <= LIMIT_MIB * MIB else f"OVER {LIMIT_MIB} MiB"
        over |= total > LIMIT_MIB * MIB
        print(f"call {name}: carry {' + '.join(f'{p} {s / MIB:.1f}' for p, s in carried.items()) or 'nothing'}"
              f" -> {total / MIB:.1f} MiB with the tree: {verdict}")
    return int(over)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("pack-encoder").add_argument("dest", type=Path)
    unpack = sub.add_parser("unpack-encoder")
    unpack.add_argument("packed", type=Path)
    unpack.add_argument("dest", type=Path)
    sub.add_parser("slim-packages").add_argument("dest", type=Path)
    count = sub.add_parser("sizes")
    count.add_argument("--call", action="append", default=[], help="NAME=PATH,PATH: the carry of one call")
    count.add_argument("--top", type=int, default=8)
    copy = sub.add_parser("copy-tree")
    copy.add_argument("dest", type=Path)
    copy.add_argument("--carry", nargs="*", default=[])
    for command in (count, copy):
        command.add_argument("--repo", type=Path, default=Path("."))
        command.add_argument("--without-from", type=Path, default=None, help="a list of paths to leave out")
    args = parser.parse_args(argv)
    if args.command == "pack-encoder":
        pack_encoder(args.dest)
    elif args.command == "unpack-encoder":
        unpack_encoder(args.packed, args.dest)
    elif args.command == "slim-packages":
        slim_packages(args.dest)
    elif args.command == "copy-tree":
        copy_tree(args.repo.resolve(), args.dest, args.carry, read_list(args.without_from))
    else:
        return sizes(args.repo.resolve(), args.call, args.top, read_list(args.without_from))
    return 0


if __name__ == "__main__":
    sys.exit(main())
