"""Data pipeline throughput: samples/s through full preprocessing (decode, static_hd crops at
384 px, templating, tokenization, layout) with 0 and N grain workers.

    python benchmarks/bench_data.py [--workers 0,2] [--samples 96] [--batch 8] [--image-px 640]

Synthetic offline data: JPEGs of --image-px on the long side and a tiny BPE tokenizer, so the
numbers measure image work (the dominant cost), not tokenizer size.
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile
import time


def make_data(root: str, n: int, px: int) -> tuple[str, str]:
    import numpy as np

    from fusion_jax.data.testing import gradient_image
    imgdir = os.path.join(root, "images")
    os.makedirs(imgdir, exist_ok=True)
    rng = np.random.default_rng(0)
    with open(os.path.join(root, "data.jsonl"), "w") as f:
        for i in range(n):
            w, h = px, int(px * rng.uniform(0.6, 1.0))
            gradient_image(w, h, seed=i).save(os.path.join(imgdir, f"{i}.jpg"), quality=90)
            conv = [{"from": "human", "value": "<image>\nDescribe the picture in detail."},
                    {"from": "gpt", "value": "There are two dogs playing in the park. " * 8},
                    {"from": "human", "value": "How many apples are on the table?"},
                    {"from": "gpt", "value": "Three apples."}]
            f.write(json.dumps({"id": str(i), "image": f"{i}.jpg", "conversations": conv}) + "\n")
    return os.path.join(root, "data.jsonl"), imgdir


def run(path, imgdir, tokdir, workers: int, batches: int, batch: int, size: int, threads: int = 1) -> float:
    from fusion_jax.data.pipeline import PipelineConfig, build_dataset, open_source
    from fusion_jax.data.sample import SampleConfig, SampleProcessor
    from fusion_jax.data.tokenizer import load_tokenizer
    proc = SampleProcessor(load_tokenizer(tokdir), SampleConfig(image_size=size, max_length=2048),
                           image_folder=imgdir)
    ds = build_dataset(open_source(path), proc, PipelineConfig(
        batch_size=batch, seed=0, seq_buckets=(1024, 2048), worker_count=workers,
        worker_buffer_size=2, read_threads=threads, process_index=0, process_count=1))
    it = iter(ds)
    next(it)  # warm-up: worker start, first batch
    t = time.perf_counter()
    for _ in range(batches):
        next(it)
    dt = time.perf_counter() - t
    if hasattr(it, "close"):
        it.close()
    return batches * batch / dt


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workers", default="0,2")
    ap.add_argument("--samples", type=int, default=96, help="distinct records (the set repeats)")
    ap.add_argument("--batches", type=int, default=12)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--image-px", type=int, default=640)
    ap.add_argument("--size", type=int, default=384)
    ap.add_argument("--threads", type=int, default=1, help="grain read threads per process")
    args = ap.parse_args()
    from absl import flags
    flags.FLAGS.mark_as_parsed()  # grain workers read absl flags
    from fusion_jax.data.testing import make_tokenizer_folder
    with tempfile.TemporaryDirectory() as root:
        path, imgdir = make_data(root, args.samples, args.image_px)
        tokdir = make_tokenizer_folder(os.path.join(root, "tok"))
        print(f"cpu cores: {os.cpu_count()}  image {args.image_px}px -> static_hd crops {args.size}px, "
              f"batch {args.batch}")
        for w in (int(x) for x in args.workers.split(",")):
            sps = run(path, imgdir, tokdir, w, args.batches, args.batch, args.size, args.threads)
            print(f"workers={w} threads={args.threads}: {sps:.1f} samples/s")


if __name__ == "__main__":
    main()
