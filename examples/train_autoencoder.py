"""Anomaly detection from shardify shards: a tiny convolutional autoencoder, on the CPU.

It trains on normal images only (`select`), then compares the reconstruction error of normal and
defect test images: a model that has only seen normal batteries reconstructs defects worse.

    python examples/train_autoencoder.py OUT [--steps 200] [--data-type ct] [--workers 2]
    python examples/train_autoencoder.py      # on a sample dataset made in a temporary folder

Needs PyTorch (`pip install 'shardify[train]'`); without it, it says so and exits 0.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import webdataset as wds

import shardify

SIZE = 64  # images are resized to SIZE x SIZE


class Prepare:
    """(PIL image, label, meta) -> (CxHxW float array in [0, 1], label); meta is dropped
    because the default collate cannot batch its None values."""

    def __init__(self, mode: str) -> None:
        self.mode = mode

    def __call__(self, item: tuple[Any, int, dict]) -> tuple[np.ndarray, int]:
        image, label, _ = item
        pixels = np.asarray(image.convert(self.mode).resize((SIZE, SIZE)), dtype=np.float32)
        return (pixels.reshape(SIZE, SIZE, -1) / 255.0).transpose(2, 0, 1), label


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", nargs="?", type=Path,
                        help="a shardify output (default: make a sample one in a temp folder)")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--data-type", choices=("ct", "rgb"), default="ct")
    parser.add_argument("--workers", type=int, default=2, help="DataLoader worker processes")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    try:
        import torch  # noqa: F401
    except ModuleNotFoundError:
        print("train_autoencoder: PyTorch is not installed, nothing to do; "
              "pip install 'shardify[train]' to run this example")
        return 0
    if args.out is not None:
        return run(args.out, args)
    with tempfile.TemporaryDirectory() as tmp:
        return run(sample_output(Path(tmp)), args)


def sample_output(tmp: Path) -> Path:
    """`shardify synth` + `shardify convert`, as `make demo` does, but larger."""
    from shardify.cli import main as shardify_main
    from shardify.profiles.battery.sample import synthesize

    source = synthesize(tmp / "data", scale=2).root
    out = tmp / "shards"
    shardify_main(["convert", str(source), "--out", str(out), "--shard-size", "128KiB",
                   "--quiet"])
    return out


def run(out: Path, args: argparse.Namespace) -> int:
    import torch
    from torch import nn

    torch.manual_seed(0)
    mode, channels = ("L", 1) if args.data_type == "ct" else ("RGB", 3)
    model = nn.Sequential(  # 64 -> 8 -> 64; the 8x8x8 bottleneck cannot copy its input
        nn.Conv2d(channels, 16, 3, stride=2, padding=1), nn.ReLU(),
        nn.Conv2d(16, 32, 3, stride=2, padding=1), nn.ReLU(),
        nn.Conv2d(32, 8, 3, stride=2, padding=1), nn.ReLU(),
        nn.ConvTranspose2d(8, 32, 4, stride=2, padding=1), nn.ReLU(),
        nn.ConvTranspose2d(32, 16, 4, stride=2, padding=1), nn.ReLU(),
        nn.ConvTranspose2d(16, channels, 4, stride=2, padding=1), nn.Sigmoid(),
    )

    # Normal images only; resampled shards give an endless stream for a step-based loop.
    train = shardify.open_dataset(out, "train", select={"data_type": args.data_type, "label": 0},
                                  resample=True, seed=0).compose(wds.map(Prepare(mode)))
    loader = torch.utils.data.DataLoader(train, batch_size=args.batch_size,
                                         num_workers=args.workers)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses = []
    for step, (images, _) in enumerate(loader):
        if step == args.steps:
            break
        loss = nn.functional.mse_loss(model(images), images)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    print(f"trained {len(losses)} steps on normal {args.data_type} images "
          f"(batch {args.batch_size}, {args.workers} workers): "
          f"loss {losses[0]:.4f} -> {np.mean(losses[-10:]):.4f}")

    test = shardify.open_dataset(out, "test", select={"data_type": args.data_type},
                                 shuffle=0).compose(wds.map(Prepare(mode)))
    errors: dict[int, list[float]] = {0: [], 1: []}
    model.eval()
    with torch.no_grad():
        for images, labels in torch.utils.data.DataLoader(test, batch_size=64):
            per_image = ((model(images) - images) ** 2).mean(dim=(1, 2, 3))
            for label, error in zip(labels.tolist(), per_image.tolist(), strict=True):
                errors[label].append(error)
    normal, defect = np.array(errors[0]), np.array(errors[1])
    print(f"test reconstruction error (MSE per image): normal {_mean(normal)} "
          f"(n={normal.size}), defect {_mean(defect)} (n={defect.size}); "
          f"AUROC {_auroc(normal, defect)}")
    return 0


def _mean(values: np.ndarray) -> str:
    return f"{values.mean():.5f}" if values.size else "n/a"


def _auroc(normal: np.ndarray, defect: np.ndarray) -> str:
    """P(defect error > normal error), ties counting half: 0.5 is chance, 1.0 perfect."""
    if not normal.size or not defect.size:
        return "n/a (needs both classes)"
    above = (defect[:, None] > normal[None, :]).mean()
    ties = (defect[:, None] == normal[None, :]).mean()
    return f"{above + ties / 2:.2f}"


if __name__ == "__main__":
    sys.exit(main())
