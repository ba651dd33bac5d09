"""Convolution layout: the pretrained image encoders in torch's default (NCHW) layout against channels-last.

The tower cache runs EfficientNet-lite0 over every photo of the Flickr8k preset and the reference
stage runs lite2 over the test photos: on 2 cores they are the preset's two largest encoding costs.
This times each encoder (the packaged ImageNet weights on timm's model, average-pooled) on the same
random batch in both layouts, alternating, in one process on one thread (the stages' actors each
run one), and records the largest difference of their outputs.

    python -m benchmarks.conv_layout                 # lite0 at 224 px, lite2 at 260 px, batch 32

Writes ``benchmarks/results/conv_layout_cpu.json``.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
from pathlib import Path

import torch

from pipeline.io import write_json

RESULTS = Path(__file__).resolve().parent / "results"
ENCODERS = (("efficientnet-lite0", 224), ("efficientnet-lite2", 260))


def ms_per_image(encoder: torch.nn.Module, images: torch.Tensor) -> float:
    start = time.perf_counter()
    encoder(images)
    return (time.perf_counter() - start) * 1000 / len(images)


@torch.no_grad()
def compare(name: str, size: int, batch: int, repeats: int) -> dict[str, float | int | str]:
    from pipeline.clip.towers import channels_last, packaged_efficientnet

    torch.manual_seed(0)
    images = torch.randn(batch, 3, size, size)
    default = packaged_efficientnet(name)
    fast = channels_last(packaged_efficientnet(name))
    default(images), fast(images)  # warm-up: oneDNN picks and caches its kernels on the first call
    times: dict[str, list[float]] = {"nchw": [], "channels_last": []}
    for _ in range(repeats):
        times["nchw"].append(ms_per_image(default, images))
        times["channels_last"].append(ms_per_image(fast, images))
    nchw, last = statistics.median(times["nchw"]), statistics.median(times["channels_last"])
    return {"encoder": name, "image_size": size, "batch": batch, "nchw_ms_per_image": nchw,
            "channels_last_ms_per_image": last, "speedup": nchw / last,
            "max_abs_difference": float((default(images) - fast(images)).abs().max())}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.conv_layout", description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default=str(RESULTS / "conv_layout_cpu.json"))
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    rows = [compare(name, size, args.batch, args.repeats) for name, size in ENCODERS]
    for row in rows:
        print(f"{row['encoder']} at {row['image_size']} px: {row['nchw_ms_per_image']:.1f} ms -> "
              f"{row['channels_last_ms_per_image']:.1f} ms a photo ({row['speedup']:.2f}x), "
              f"outputs within {row['max_abs_difference']:.1e}")
    write_json(Path(args.out), {"what": "ms per image, one thread, NCHW against channels-last (median of repeats)",
                                "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores",
                                "torch": torch.__version__, "repeats": args.repeats, "encoders": rows})
    print(f"-> {args.out}")


if __name__ == "__main__":
    main()
