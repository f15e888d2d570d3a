"""Input-pipeline throughput: the uint8 batches train.py reads, with and without
data.cache_in_memory.

    python experiments/bench_input.py --config=configs/ddpm_cifar.py   # the config's dataset
    python experiments/bench_input.py --synthetic-tfds=50000           # CIFAR-10-shaped, made here

A training job runs no faster than its batches arrive: an accelerator asked for 5,000 training
images/s (issue 4) needs a pipeline that delivers them with time to spare. Prints images/s of
data.create_batches (training.batch_size, the config's random_flip; the first batch not timed,
then as many as --seconds allows), per number of reader threads, for the source read at every
step and for the same source read once into memory, the ratio of the two, and how long the
read into memory took. CIFAR-10 cannot be downloaded on the project's machine; --synthetic-tfds=N
prepares a tfds dataset of N 32x32 RGB PNG images (bilinearly upsampled 8x8 noise, so they
compress about like small photographs) in --data-dir, read through the same tfds array_record
path as cifar10.
"""

from __future__ import annotations

import argparse
import tempfile
import time

import bench_common as bc
import numpy as np

from diffusion_jax import data

SYNTHETIC = "synthetic_cifar"


def prepare_synthetic(num_examples: int, data_dir: str) -> None:
    """The tfds dataset 'synthetic_cifar' (train split) with num_examples images, in data_dir."""
    import tensorflow_datasets as tfds
    from PIL import Image

    from diffusion_jax.data import prepare

    class SyntheticCifar(tfds.core.GeneratorBasedBuilder):
        VERSION = tfds.core.Version("1.0.0")

        def _info(self):
            features = {
                "image": tfds.features.Image(shape=(32, 32, 3)),
                "label": tfds.features.ClassLabel(num_classes=10),
            }
            features = tfds.features.FeaturesDict(features)
            return tfds.core.DatasetInfo(builder=self, features=features)

        def _split_generators(self, dl_manager):
            return {"train": self._generate_examples()}

        def _generate_examples(self):
            rng = np.random.default_rng(0)
            for i in range(num_examples):
                noise = Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8))
                yield i, {"image": noise.resize((32, 32), Image.BILINEAR), "label": i % 10}

    del SyntheticCifar  # registered with tfds by its definition
    prepare.prepare(SYNTHETIC, data_dir)


def images_per_second(source, config, threads: int, seconds: float) -> float:
    batch = config.training.batch_size
    batches = data.create_batches(
        source,
        global_batch_size=batch,
        seed=0,
        random_flip=config.data.random_flip,
        num_threads=threads,
    )
    next(batches)
    count, start = 0, time.perf_counter()
    while True:
        next(batches)
        count += 1
        elapsed = time.perf_counter() - start
        if elapsed >= seconds:
            return count * batch / elapsed


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--config", default="configs/ddpm_cifar.py")
    p.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE")
    p.add_argument("--synthetic-tfds", type=int, default=0, metavar="N")
    p.add_argument("--data-dir", help="where --synthetic-tfds prepares (default: a temp dir)")
    p.add_argument("--threads", default="0,2", help="reader threads, comma-separated")
    p.add_argument("--seconds", type=float, default=5.0, help="timed per row")
    p.add_argument("--json", help="also write the rows to this JSON file")
    args = p.parse_args()

    config = bc.load_config(args.config, args.set)
    with tempfile.TemporaryDirectory() as tmp:
        if args.synthetic_tfds:
            data_dir = args.data_dir or tmp
            prepare_synthetic(args.synthetic_tfds, data_dir)
            config.data.update(dataset=SYNTHETIC, data_dir=data_dir, image_size=32, num_channels=3)
        config.data.cache_in_memory = False
        source = data.create_source(config.data, split="train")
        start = time.perf_counter()
        cached = data.InMemorySource(source)
        read_once = time.perf_counter() - start
        rows = []
        for threads in (int(t) for t in args.threads.split(",")):
            read = images_per_second(source, config, threads, args.seconds)
            memory = images_per_second(cached, config, threads, args.seconds)
            rows.append(
                {
                    "threads": threads,
                    "read_img_s": read,
                    "cached_img_s": memory,
                    "cached/read": memory / read,
                }
            )
    bc.report(
        rows,
        f"input pipeline: {config.data.dataset}, {len(source):,} examples, batch "
        f"{config.training.batch_size}, random_flip={config.data.random_flip}; read into memory "
        f"once in {read_once:.1f} s",
        args.json,
    )


if __name__ == "__main__":
    main()
