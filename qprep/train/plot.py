"""The loss curve of a run as a PNG, drawn with Pillow (already there through torchvision)."""

from __future__ import annotations

import json
from pathlib import Path

WIDTH, HEIGHT, MARGIN = 720, 400, 56
VALIDATION_COLOUR = (200, 40, 40)


def plot_loss(metrics: str | Path, out: str | Path) -> Path:
    """Loss per batch (thin) and its running mean over 10 batches (thick) from `metrics.jsonl`, the
    validation loss where the run measured it (red, on the same scale), and the learning rate of
    each optimizer step (orange, on its own scale: 0 to its peak)."""
    from PIL import Image, ImageDraw

    every = [json.loads(line) for line in Path(metrics).read_text().splitlines() if line.strip()]
    rows = [row for row in every if "loss" in row]  # training batches
    losses = [row["loss"] for row in rows]
    rates = [(index, row["lr"]) for index, row in enumerate(rows) if "lr" in row]
    validations, seen = [], 0  # (batches trained before it, validation loss)
    for row in every:
        seen += "loss" in row
        if "val_loss" in row:
            validations.append((max(seen - 1, 0), row["val_loss"]))
    image = Image.new("RGB", (WIDTH, HEIGHT), "white")
    draw = ImageDraw.Draw(image)
    left, top, right, bottom = MARGIN, MARGIN // 2, WIDTH - MARGIN // 2, HEIGHT - MARGIN
    draw.rectangle((left, top, right, bottom), outline="black")
    if losses:
        low, high = min(losses + [v for _, v in validations]), max(losses + [v for _, v in validations])
        span = (high - low) or 1.0

        def point(index: int, value: float) -> tuple[float, float]:
            x = left + (right - left) * (index / max(1, len(losses) - 1))
            return x, bottom - (bottom - top) * (value - low) / span

        draw.line([point(i, v) for i, v in enumerate(losses)], fill=(150, 170, 220), width=1)
        smooth = [sum(losses[max(0, i - 9):i + 1]) / len(losses[max(0, i - 9):i + 1]) for i in range(len(losses))]
        draw.line([point(i, v) for i, v in enumerate(smooth)], fill=(20, 60, 160), width=3)
        if validations:
            points = [point(index, value) for index, value in validations]
            if len(points) > 1:
                draw.line(points, fill=VALIDATION_COLOUR, width=2)
            for x, y in points:
                draw.ellipse((x - 4, y - 4, x + 4, y + 4), fill=VALIDATION_COLOUR)
            draw.text((right - 120, top + 18), f"validation (last {validations[-1][1]:.3f})", fill=VALIDATION_COLOUR)
        draw.text((4, top), f"{high:.3f}", fill="black")
        draw.text((4, bottom - 10), f"{low:.3f}", fill="black")
        draw.text((right - 90, bottom + 8), f"{len(losses)} batches", fill="black")
        peak = max((rate for _, rate in rates), default=0.0)
        if len(rates) > 1 and peak > 0:
            scaled = [(point(index, low)[0], bottom - (bottom - top) * rate / peak) for index, rate in rates]
            draw.line(scaled, fill=(230, 120, 20), width=2)
            draw.text((right - 120, top + 4), f"lr (peak {peak:.2g})", fill=(230, 120, 20))
    draw.text((left, bottom + 8), "loss per batch (running mean of 10 in bold)", fill="black")
    image.save(out)
    return Path(out)
