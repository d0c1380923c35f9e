"""Build the embedded emoji data set: pinned npm packages of SVG emoji, rendered at several sizes.

SVG artwork renders exactly at any resolution, so every size (32 px for the base model, 64/128/256 px
for the higher-resolution evaluation) has true ground truth. Four styles of the same emoji concepts
come from four packages; the train/eval split is made by concept so that every style of a held-out
emoji stays out of training.

Layout under ``cache_dir``::

    packages/<tarball>.tgz           npm pack output (fetched once)
    images/<size>/<id>.png           RGB renders on white
    manifest.jsonl                   one record per image: id, source, style, caption, concept, split
    dataset.json                     sidecar: package versions, licences, sizes, seed, counts
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import re
import subprocess
import tarfile
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass
from multiprocessing import Pool
from pathlib import Path

from PIL import Image
from tqdm import tqdm

from ..io import atomic_path

logger = logging.getLogger(__name__)

MANIFEST = "manifest.jsonl"
SIDECAR = "dataset.json"
#: The embedded model's base size (128 px) and the 4x/16x pixels its cascade is tuned and scored at, and v2's
#: 32/64 px.
DEFAULT_SIZES: tuple[int, ...] = (32, 64, 128, 256, 512)
BACKGROUND = (255, 255, 255)

# Pinned packages: (npm name, version). Captions for Twemoji/Noto/Fluent come from emojibase-data.
PACKAGES: dict[str, tuple[str, str]] = {
    "openmoji": ("openmoji", "17.0.0"),
    "twemoji": ("@twemoji/svg", "15.0.0"),
    "noto": ("@iconify-json/noto", "1.2.9"),
    "fluent": ("fluentui-emoji", "1.3.0"),
    "emojibase": ("emojibase-data", "17.0.0"),
}
SOURCES: tuple[str, ...] = ("openmoji", "twemoji", "noto", "fluent")
#: The members of each package that the readers below use (``slim_package`` keeps only these).
MEMBERS: dict[str, "re.Pattern[str]"] = {
    "openmoji": re.compile(r"package/(color/svg/[^/]+\.svg|data/openmoji\.json)"),
    "twemoji": re.compile(r"package/[0-9a-f-]+\.svg"),
    "noto": re.compile(r"package/icons\.json"),
    "fluent": re.compile(r"package/icons/flat/[^/]+\.svg"),
    "emojibase": re.compile(r"package/en/data\.json"),
}

LICENSES: dict[str, dict[str, str]] = {
    "openmoji": {
        "package": "openmoji@17.0.0",
        "license": "CC BY-SA 4.0",
        "attribution": "OpenMoji - the open-source emoji and icon project (https://openmoji.org)",
    },
    "twemoji": {
        "package": "@twemoji/svg@15.0.0",
        "license": "CC BY 4.0",
        "attribution": "Twemoji graphics by Twitter, Inc and other contributors (jdecked/twemoji)",
    },
    "noto": {
        "package": "@iconify-json/noto@1.2.9",
        "license": "Apache-2.0",
        "attribution": "Noto Emoji by Google Inc (googlefonts/noto-emoji), via Iconify",
    },
    "fluent": {
        "package": "fluentui-emoji@1.3.0",
        "license": "MIT",
        "attribution": "Fluent Emoji by Microsoft Corporation (microsoft/fluentui-emoji)",
    },
    "emojibase": {
        "package": "emojibase-data@17.0.0",
        "license": "MIT",
        "attribution": "Emojibase (captions: CLDR labels and tags, Unicode licence)",
    },
}

# The style words that end each caption; the package name is the least ambiguous style label.
STYLES: dict[str, str] = {s: f"{s} style" for s in SOURCES}

_SKIN_TONES = ("light", "medium-light", "medium", "medium-dark", "dark")
_TAGS_PER_CAPTION = 2


@dataclass(frozen=True)
class Item:
    """One emoji image before rendering."""

    id: str
    source: str
    label: str
    tags: tuple[str, ...]
    svg: str

    @property
    def concept(self) -> str:
        return concept_key(self.label)

    @property
    def caption(self) -> str:
        return make_caption(self.label, self.tags, self.source)


@dataclass(frozen=True)
class Record:
    """One manifest line."""

    id: str
    source: str
    style: str
    caption: str
    label: str
    concept: str
    split: str


class PackageFetchError(RuntimeError):
    """An npm package could not be fetched."""


def default_cache_dir() -> Path:
    """``$SELFCASCADE_CACHE`` or ``~/.cache/selfcascade``."""
    env = os.environ.get("SELFCASCADE_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "selfcascade"


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def concept_key(label: str) -> str:
    """Style-independent key: the label without its skin tone and without separators.

    Removing separators makes "one o'clock" (emojibase) and "one-oclock" (a file name) agree, and
    dropping the skin tone keeps all tones of one emoji on the same side of the split.
    """
    base = re.sub(r"[:,]?\s*(medium[- ]light|medium[- ]dark|light|medium|dark) skin tones?\b", "", label.lower())
    return re.sub(r"[^a-z0-9]+", "", base)


def make_caption(label: str, tags: Sequence[str], source: str) -> str:
    """Label, a few tags and the style, e.g. "grinning face, cheerful, cheery, twemoji style"."""
    label_words = set(slug(label).split("-"))
    extra = [t for t in tags if t and slug(t) not in label_words][:_TAGS_PER_CAPTION]
    return ", ".join([label, *extra, STYLES[source]])


PROMPT_FORMS: dict[str, Callable[[Mapping[str, str]], str]] = {
    "caption": lambda r: r["caption"],
    "name": lambda r: r["label"],
    "name_style": lambda r: f"{r['label']}, {r['style']}",
}
"""Ways to prompt for a manifest record: its training caption, the emoji's name alone ("red apple", as people
type), and the name with the style ("red apple, noto style")."""


def _atomic_write_bytes(path: Path, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def _atomic_write_text(path: Path, text: str) -> None:
    _atomic_write_bytes(path, text.encode("utf-8"))


# --------------------------------------------------------------------------------------------------
# Fetching


def fetch_package(name: str, version: str, dest: Path) -> Path:
    """``npm pack name@version`` into ``dest`` once; return the tarball path.

    A tarball already there is used as it is, so a ``packages/`` folder filled beforehand (e.g. by
    ``slim_packages``) lets ``build_dataset`` run offline, without npm.
    """
    dest.mkdir(parents=True, exist_ok=True)
    tarball = dest / f"{name.lstrip('@').replace('/', '-')}-{version}.tgz"
    if tarball.exists():
        return tarball
    spec = f"{name}@{version}"
    logger.info("fetching %s with npm pack", spec)
    try:
        proc = subprocess.run(
            ["npm", "pack", spec, "--silent"],
            cwd=dest, capture_output=True, text=True, timeout=600, check=False,
        )
    except FileNotFoundError as err:
        raise PackageFetchError(
            f"cannot fetch {spec}: the `npm` command is not installed. Install Node.js/npm "
            "(e.g. `apt-get install npm`) so that `npm pack` can reach the npm registry."
        ) from err
    except subprocess.TimeoutExpired as err:
        raise PackageFetchError(f"`npm pack {spec}` timed out; check that npm can reach the npm registry") from err
    if proc.returncode != 0 or not tarball.exists():
        raise PackageFetchError(
            f"`npm pack {spec}` failed (exit {proc.returncode}); npm must be able to reach the npm "
            f"registry (check network/proxy and `npm config get registry`).\n{proc.stderr.strip()[-2000:]}"
        )
    return tarball


def _members(tarball: Path, keep: "re.Pattern[str]") -> Iterator[tuple[str, bytes]]:
    """Yield (path, bytes) of regular files in a tarball whose path matches ``keep``.

    Read straight from the archive: nothing is extracted, so no path in the tarball ever touches the
    filesystem.
    """
    with tarfile.open(tarball, "r:gz") as tar:
        for member in tar:
            if member.isfile() and keep.fullmatch(member.name):
                handle = tar.extractfile(member)
                if handle is not None:
                    yield member.name, handle.read()


# --------------------------------------------------------------------------------------------------
# Per-source readers


class Emojibase:
    """English CLDR labels and tags, looked up by code point or by label slug."""

    def __init__(self, tarball: Path) -> None:
        ((_, raw),) = list(_members(tarball, MEMBERS["emojibase"]))
        self.by_hex: dict[str, tuple[str, tuple[str, ...]]] = {}
        self.by_slug: dict[str, tuple[str, tuple[str, ...]]] = {}
        for entry in json.loads(raw):
            tags = tuple(entry.get("tags") or ())
            for variant in (entry, *entry.get("skins", ())):
                value = (variant["label"], tuple(variant.get("tags") or tags))
                self.by_hex[_norm_hex(variant["hexcode"])] = value
                self.by_slug[slug(variant["label"])] = value

    def lookup_hex(self, hexcode: str) -> tuple[str, tuple[str, ...]] | None:
        return self.by_hex.get(_norm_hex(hexcode))

    def lookup_name(self, name: str) -> tuple[str, tuple[str, ...]]:
        """Label and tags for a file/icon name like "waving-hand-medium-skin-tone"; the name itself
        (de-slugged, no tags) when emojibase does not know it."""
        found = self.by_slug.get(name)
        if found is None:
            tone = re.fullmatch(r"(.+)-(medium-light|medium-dark|light|medium|dark)-skin-tone", name)
            base = self.by_slug.get(tone.group(1)) if tone else None
            if tone and base:
                found = (f"{base[0]}: {tone.group(2)} skin tone", base[1])
        return found or (name.replace("-", " "), ())


def _norm_hex(hexcode: str) -> str:
    """Code point sequences differ in FE0F (variation selector) between packages; drop it."""
    parts = [p.lstrip("0") or "0" for p in hexcode.lower().replace("_", "-").split("-")]
    return "-".join(p for p in parts if p != "fe0f")


def read_openmoji(tarball: Path) -> list[Item]:
    files: dict[str, str] = {}
    meta: bytes | None = None
    for path, data in _members(tarball, MEMBERS["openmoji"]):
        if path.endswith("openmoji.json"):
            meta = data
        else:
            files[Path(path).stem] = data.decode("utf-8")
    if meta is None:
        raise ValueError(f"{tarball.name}: data/openmoji.json missing; is this the openmoji package?")
    items = []
    for entry in json.loads(meta):
        svg = files.get(entry["hexcode"])
        if svg is None:
            continue
        tags = [t.strip() for t in f"{entry.get('tags', '')},{entry.get('openmoji_tags', '')}".split(",")]
        items.append(Item(f"openmoji-{entry['hexcode']}", "openmoji", entry["annotation"], tuple(tags), svg))
    return items


def read_twemoji(tarball: Path, emojibase: Emojibase) -> list[Item]:
    items = []
    for path, data in _members(tarball, MEMBERS["twemoji"]):
        hexcode = Path(path).stem
        found = emojibase.lookup_hex(hexcode)
        if found is None:  # no caption to learn from: counted as skipped by the caller
            continue
        items.append(Item(f"twemoji-{hexcode}", "twemoji", found[0], found[1], data.decode("utf-8")))
    return items


def read_noto(tarball: Path, emojibase: Emojibase) -> list[Item]:
    ((_, raw),) = list(_members(tarball, MEMBERS["noto"]))
    data = json.loads(raw)
    items = []
    for name, icon in data["icons"].items():
        width = icon.get("width", data.get("width", 16))
        height = icon.get("height", data.get("height", 16))
        left, top = icon.get("left", 0), icon.get("top", 0)
        svg = (
            f'<svg xmlns="http://www.w3.org/2000/svg" xmlns:xlink="http://www.w3.org/1999/xlink" '
            f'width="{width}" height="{height}" viewBox="{left} {top} {width} {height}">{icon["body"]}</svg>'
        )
        label, tags = emojibase.lookup_name(re.sub(r"-tone([1-5])$", _noto_tone, name))
        items.append(Item(f"noto-{name}", "noto", label, tags, svg))
    return items


def _noto_tone(match: "re.Match[str]") -> str:
    return f"-{_SKIN_TONES[int(match.group(1)) - 1]}-skin-tone"


def read_fluent(tarball: Path, emojibase: Emojibase) -> list[Item]:
    tone = re.compile(r"-(default|medium-light|medium-dark|light|medium|dark)$")
    items = []
    for path, data in _members(tarball, MEMBERS["fluent"]):
        name = Path(path).stem
        key = tone.sub(lambda m: "" if m.group(1) == "default" else f"-{m.group(1)}-skin-tone", name)
        label, tags = emojibase.lookup_name(key)
        items.append(Item(f"fluent-{name}", "fluent", label, tags, data.decode("utf-8")))
    return items


def slim_packages(packages_dir: Path, dest: Path, sources: Iterable[str] = SOURCES) -> list[Path]:
    """Copies in ``dest`` of the fetched tarballs of ``sources`` (and emojibase's captions) holding only the
    members the readers use, under the same names: ``build_dataset`` with them in its ``packages/`` renders the
    same data set offline from a fifth of the bytes (8 MB instead of 38 MB for all four sources)."""
    dest.mkdir(parents=True, exist_ok=True)
    written = []
    for source in [*sources, "emojibase"]:
        tarball = fetch_package(*PACKAGES[source], packages_dir)
        with atomic_path(dest / tarball.name) as tmp, tarfile.open(tarball, "r:gz") as full, \
                tarfile.open(tmp, "w:gz", compresslevel=9) as slim:
            for member in full:
                if member.isfile() and MEMBERS[source].fullmatch(member.name):
                    slim.addfile(member, full.extractfile(member))
        written.append(dest / tarball.name)
    return written


def collect_items(packages_dir: Path, sources: Iterable[str]) -> list[Item]:
    """Fetch the packages for ``sources`` and read their SVGs and captions."""
    sources = list(sources)
    unknown = set(sources) - set(SOURCES)
    if unknown:
        raise ValueError(f"unknown source(s) {sorted(unknown)}; choose from {list(SOURCES)}")
    tarballs = {s: fetch_package(*PACKAGES[s], packages_dir) for s in sources}
    emojibase = None
    if set(sources) & {"twemoji", "noto", "fluent"}:
        emojibase = Emojibase(fetch_package(*PACKAGES["emojibase"], packages_dir))
    items: list[Item] = []
    for source in sources:
        if source == "openmoji":
            found = read_openmoji(tarballs[source])
        else:
            reader = {"twemoji": read_twemoji, "noto": read_noto, "fluent": read_fluent}[source]
            found = reader(tarballs[source], emojibase)
        logger.info("%s: %d SVGs with captions", source, len(found))
        items.extend(found)
    return items


# --------------------------------------------------------------------------------------------------
# Rendering


def render_svg(svg: str, size: int) -> Image.Image:
    """Render an SVG to a ``size``x``size`` RGB image on white, resvg first, cairosvg as fallback.

    Raises ``ValueError`` when neither renderer accepts the file.
    """
    errors = []
    png: bytes | None = None
    try:
        import resvg_py

        png = bytes(resvg_py.svg_to_bytes(svg_string=svg, width=size, height=size))
    except Exception as err:  # resvg raises plain exceptions for unsupported/invalid SVG
        errors.append(f"resvg: {err}")
    if png is None:
        try:
            import cairosvg

            png = cairosvg.svg2png(bytestring=svg.encode("utf-8"), output_width=size, output_height=size)
        except Exception as err:  # cairosvg raises a variety of parser errors
            errors.append(f"cairosvg: {err}")
    if png is None:
        raise ValueError("; ".join(errors))
    image = Image.open(io.BytesIO(png)).convert("RGBA")
    if image.size != (size, size):  # non-square viewBox: fit and centre
        image.thumbnail((size, size), Image.LANCZOS)
    canvas = Image.new("RGBA", (size, size), BACKGROUND + (255,))
    canvas.alpha_composite(image, ((size - image.width) // 2, (size - image.height) // 2))
    return canvas.convert("RGB")


def image_path(cache_dir: Path, size: int, image_id: str) -> Path:
    return Path(cache_dir) / "images" / str(size) / f"{image_id}.png"


def _render_task(args: tuple[str, str, str, tuple[int, ...]]) -> tuple[str, str | None]:
    """Render one item at every missing size; return (id, error or None)."""
    cache_dir, image_id, svg, sizes = args
    try:
        for size in sizes:
            path = image_path(Path(cache_dir), size, image_id)
            if path.exists():
                continue
            buf = io.BytesIO()
            render_svg(svg, size).save(buf, format="PNG", optimize=False)
            _atomic_write_bytes(path, buf.getvalue())
    except ValueError as err:
        return image_id, str(err)
    return image_id, None


# --------------------------------------------------------------------------------------------------
# Split and manifest


def split_concepts(concepts: Iterable[str], eval_fraction: float, min_eval: int, seed: int) -> set[str]:
    """Pick held-out concepts by a seeded hash, so the choice is stable under re-runs and additions.

    Returns the eval concepts: the ``max(min_eval, eval_fraction * n)`` concepts with the smallest hash.
    """
    unique = sorted(set(concepts))
    n_eval = min(len(unique), max(min_eval, round(eval_fraction * len(unique))))
    ranked = sorted(unique, key=lambda c: hashlib.sha256(f"{seed}:{c}".encode()).hexdigest())
    return set(ranked[:n_eval])


def read_manifest(cache_dir: Path) -> list[dict]:
    """Manifest records of a built data set."""
    path = Path(cache_dir) / MANIFEST
    if not path.exists():
        raise FileNotFoundError(f"{path} not found; build the data set first with `selfcascade data build`")
    with path.open(encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def build_dataset(
    cache_dir: Path | str | None = None,
    sizes: Sequence[int] = DEFAULT_SIZES,
    sources: Sequence[str] = SOURCES,
    eval_fraction: float = 0.15,
    min_eval_concepts: int = 500,
    seed: int = 0,
    workers: int = 2,
    items: list[Item] | None = None,
    limit: int | None = None,
) -> Path:
    """Fetch, render and index the emoji data set; return the manifest path.

    Idempotent: tarballs and PNGs already in the cache are reused, so re-running with an extra size
    renders only that size. ``items`` bypasses fetching (tests pass hand-made SVGs); ``limit`` keeps the
    first ``limit`` SVGs of each source (a tiny data set for smoke tests; the manifest lists only those).
    """
    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    sizes = tuple(sorted({int(s) for s in sizes}))
    if items is None:
        items = collect_items(cache_dir / "packages", sources)
    if limit is not None:
        seen: Counter = Counter()
        kept_items = []
        for it in items:
            seen[it.source] += 1
            if seen[it.source] <= limit:
                kept_items.append(it)
        items = kept_items
    for size in sizes:
        (cache_dir / "images" / str(size)).mkdir(parents=True, exist_ok=True)

    tasks = [(str(cache_dir), it.id, it.svg, sizes) for it in items]
    failed: dict[str, str] = {}
    bar = tqdm(total=len(tasks), desc=f"rendering {','.join(map(str, sizes))} px", unit="svg")
    if workers > 1 and len(tasks) > 64:
        with Pool(workers) as pool:
            results = pool.imap_unordered(_render_task, tasks, chunksize=32)
            for image_id, err in results:
                if err:
                    failed[image_id] = err
                bar.update()
    else:
        for task in tasks:
            image_id, err = _render_task(task)
            if err:
                failed[image_id] = err
            bar.update()
    bar.close()
    for image_id, err in sorted(failed.items())[:20]:
        logger.warning("skipped %s: %s", image_id, err)
    if failed:
        logger.warning("%d SVG(s) failed to render with both resvg and cairosvg and were skipped", len(failed))

    kept = [it for it in items if it.id not in failed]
    eval_concepts = split_concepts((it.concept for it in kept), eval_fraction, min_eval_concepts, seed)
    records = [
        Record(it.id, it.source, STYLES[it.source], it.caption, it.label, it.concept,
               "eval" if it.concept in eval_concepts else "train")
        for it in sorted(kept, key=lambda it: it.id)
    ]
    manifest = cache_dir / MANIFEST
    _atomic_write_text(manifest, "".join(json.dumps(asdict(r), ensure_ascii=False) + "\n" for r in records))

    counts = Counter(f"{r.source}/{r.split}" for r in records)
    previous = _read_sidecar(cache_dir)
    sidecar = {
        "packages": {s: f"{PACKAGES[s][0]}@{PACKAGES[s][1]}" for s in PACKAGES},
        "licenses": {s: LICENSES[s] for s in (*sorted({it.source for it in items}), "emojibase")},
        "sizes": sorted(set(previous.get("sizes", [])) | set(sizes)),
        "seed": seed,
        "eval_fraction": eval_fraction,
        "min_eval_concepts": min_eval_concepts,
        "counts": dict(sorted(counts.items())),
        "eval_concepts": len(eval_concepts),
        "train_concepts": len({r.concept for r in records if r.split == "train"}),
        "skipped_render_failures": len(failed),
    }
    _atomic_write_text(cache_dir / SIDECAR, json.dumps(sidecar, indent=2) + "\n")
    logger.info("wrote %s: %d images, %s", manifest, len(records), sidecar["counts"])
    return manifest


def _read_sidecar(cache_dir: Path) -> dict:
    path = cache_dir / SIDECAR
    return json.loads(path.read_text(encoding="utf-8")) if path.exists() else {}


# --------------------------------------------------------------------------------------------------
# CLI
