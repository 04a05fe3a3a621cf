"""The loss curve of a run as a PNG, drawn with Pillow (already there through torchvision)."""

from __future__ import annotations

import json
from pathlib import Path

WIDTH, HEIGHT, MARGIN = 720, 400, 56


def plot_loss(metrics: str | Path, out: str | Path) -> Path:
    """Loss per batch (thin) and its running mean over 10 batches (thick) from `metrics.jsonl`, and
    the learning rate of each optimizer step (orange, on its own scale: 0 to its peak)."""
    from PIL import Image, ImageDraw

    rows = [json.loads(line) for line in Path(metrics).read_text().splitlines() if line.strip()]
    losses = [row["loss"] for row in rows]
    rates = [(index, row["lr"]) for index, row in enumerate(rows) if "lr" in row]
    image = Image.new("RGB", (WIDTH, HEIGHT), "white")
    draw = ImageDraw.Draw(image)
    left, top, right, bottom = MARGIN, MARGIN // 2, WIDTH - MARGIN // 2, HEIGHT - MARGIN
    draw.rectangle((left, top, right, bottom), outline="black")
    if losses:
        low, high = min(losses), max(losses)
        span = (high - low) or 1.0

        def point(index: int, value: float) -> tuple[float, float]:
            x = left + (right - left) * (index / max(1, len(losses) - 1))
            return x, bottom - (bottom - top) * (value - low) / span

        draw.line([point(i, v) for i, v in enumerate(losses)], fill=(150, 170, 220), width=1)
        smooth = [sum(losses[max(0, i - 9):i + 1]) / len(losses[max(0, i - 9):i + 1]) for i in range(len(losses))]
        draw.line([point(i, v) for i, v in enumerate(smooth)], fill=(20, 60, 160), width=3)
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
