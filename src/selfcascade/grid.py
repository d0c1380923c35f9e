"""Labelled comparison grids: one row per mode, one column per size, same seed everywhere."""

from __future__ import annotations

from PIL import Image, ImageDraw, ImageFont

_PAD = 4
_LABEL_H = 14
_ROW_LABEL_W = 84


def make_grid(cells: list[list[Image.Image]], row_labels: list[str], col_labels: list[str],
              cell: int | None = None) -> Image.Image:
    """Paste every image into a cell of ``cell`` pixels (default: the largest image's side).

    Smaller images are enlarged with nearest-neighbour so their real pixels stay visible.
    """
    if len(cells) != len(row_labels) or any(len(r) != len(col_labels) for r in cells):
        raise ValueError("cells must be len(row_labels) rows of len(col_labels) images")
    cell = cell or max(max(im.size) for row in cells for im in row)
    font = ImageFont.load_default()
    label_w = max([_ROW_LABEL_W] + [int(font.getlength(label)) + 6 for label in row_labels])
    width = label_w + len(col_labels) * (cell + _PAD) + _PAD
    height = _LABEL_H + len(row_labels) * (cell + _PAD) + _PAD
    grid = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(grid)
    for j, label in enumerate(col_labels):
        draw.text((label_w + j * (cell + _PAD) + _PAD, 1), label, fill="black", font=font)
    for i, (label, row) in enumerate(zip(row_labels, cells)):
        top = _LABEL_H + i * (cell + _PAD) + _PAD
        draw.text((2, top + cell // 2 - 6), label, fill="black", font=font)
        for j, image in enumerate(row):
            scale = cell / max(image.size)
            shown = image.resize((round(image.width * scale), round(image.height * scale)), Image.NEAREST)
            grid.paste(shown, (label_w + j * (cell + _PAD) + _PAD, top))
    return grid


def make_video_grid(cells: list[list[list[Image.Image]]], row_labels: list[str], col_labels: list[str],
                    cell: int | None = None) -> list[Image.Image]:
    """``make_grid`` frame by frame: ``cells[i][j]`` is a clip (a list of frames, the same count in every cell)."""
    counts = {len(clip) for row in cells for clip in row}
    if len(counts) != 1:
        raise ValueError(f"every clip of a video grid needs the same number of frames, got {sorted(counts)}")
    return [make_grid([[clip[f] for clip in row] for row in cells], row_labels, col_labels, cell)
            for f in range(counts.pop())]
