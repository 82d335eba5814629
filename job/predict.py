"""Classify image files with a registered model, a checkpoint or an exported .pt2: one line per file.

    python -m job.predict --model models:/senet18-cifar10@champion cat.jpg ship.png
"""

import argparse
import os
import sys
import warnings

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from torch import nn

from job import cli, registry
from job.checkpoint import CheckpointError
from job.data import CLASSES

SIZE = 32  # CIFAR-10's images, what the model was trained on
BATCH = 256
# The most pixels a file may declare (~200 MB as RGB): more than any camera's photo. A larger one is refused from its
# header before a pixel is decoded: a decompression bomb (a few kB of PNG declaring billions) costs nothing.
MAX_PIXELS = 8192 * 8192


def load(source: str, device: torch.device) -> nn.Module:
    """The model behind source on device (job/registry.py load: an MLflow URI, a .pt2 or a checkpoint)."""
    if registry.is_logged(source):
        os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # stderr is for errors here
    return registry.load(source, device)


def read_image(path: str) -> torch.Tensor:
    """path's image as uint8 (3, 32, 32) RGB: turned upright by its EXIF orientation, alpha dropped, the whole
    picture resized to 32x32 (aspect ratio not kept) with PIL's bicubic filter, antialiased when shrinking."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)  # PIL's own check (frames too) refuses
        with Image.open(path) as image:
            if image.width * image.height > MAX_PIXELS:  # the header's size, nothing decoded yet
                raise Image.DecompressionBombError(f"{image.width}x{image.height} pixels")
            image = ImageOps.exif_transpose(image).convert("RGB").resize((SIZE, SIZE), Image.Resampling.BICUBIC)
    return torch.from_numpy(np.array(image)).permute(2, 0, 1).contiguous()


def main(argv: list[str] | None = None) -> int:
    """`python -m job.predict --model MODEL IMAGE...`: for each PNG/JPEG (any size), its file name and the top-k
    CIFAR-10 classes, most likely first, with their probabilities. Images are resized to 32x32 as a whole
    (aspect ratio not kept) with PIL's bicubic filter, antialiased when shrinking. A file that cannot be read
    gets an `error:` line and the exit status 1; the others are still classified."""
    parser = argparse.ArgumentParser(prog="python -m job.predict", description=main.__doc__)
    parser.add_argument("--model", required=True,
                        help="models:/NAME@ALIAS, models:/NAME/VERSION, runs:/ID/model ($MLFLOW_TRACKING_URI, "
                             "else ./mlflow.db), a checkpoint (.pt) or an exported model (.pt2)")
    parser.add_argument("--top-k", type=int, default=3, help=f"classes per image, 1 to {len(CLASSES)} (default 3)")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                        help="auto: CUDA where there is one (default)")
    parser.add_argument("images", nargs="+", metavar="IMAGE", help="PNG or JPEG files")
    args = parser.parse_args(argv)
    if not 1 <= args.top_k <= len(CLASSES):
        parser.error(f"--top-k must be between 1 and {len(CLASSES)}, got {args.top_k}")
    if args.device == "cuda" and not torch.cuda.is_available():
        cli.error("--device cuda but CUDA is not available")
        return 1
    device = torch.device("cuda" if args.device != "cpu" and torch.cuda.is_available() else "cpu")
    try:
        model = load(args.model, device)
    except CheckpointError as e:
        cli.error(str(e))
        return 1
    paths, images = [], []
    for path in args.images:
        try:
            images.append(read_image(path))
        except UnidentifiedImageError:
            cli.error(f"cannot read image {path}: not a PNG, JPEG or other image format PIL reads")
            continue
        except OSError as e:  # missing, a directory, no permission, truncated
            cli.error(f"cannot read image {path}: {e.strerror or cli.first_line(e)}")
            continue
        except (Image.DecompressionBombError, Image.DecompressionBombWarning):
            cli.error(f"cannot read image {path}: more than the {MAX_PIXELS:,} pixels ({MAX_PIXELS // 2**20} "
                      f"megapixels) job.predict reads")
            continue
        except Exception as e:  # PIL's decoders raise many kinds on a malformed file (ValueError, SyntaxError, ...)
            cli.error(f"cannot read image {path}: {cli.first_line(e)}")
            continue
        paths.append(path)
    with torch.no_grad():
        for start in range(0, len(paths), BATCH):
            probabilities = model(torch.stack(images[start:start + BATCH]).to(device)).float().softmax(1)
            top = probabilities.topk(args.top_k)
            for path, values, indices in zip(paths[start:start + BATCH], top.values.tolist(), top.indices.tolist()):
                print(f"{path}  " + "  ".join(f"{CLASSES[i]} {p:.3f}" for p, i in zip(values, indices)))
    return 0 if len(paths) == len(args.images) else 1


if __name__ == "__main__":
    sys.exit(main())
