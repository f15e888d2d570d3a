"""`InMemorySource(source)`: every example of a source decoded once, then served from memory.

A tfds split decodes a PNG per read: on the project's 2-core CPU a CIFAR-10-shaped array_record
split gave 3,300-3,600 images/s through the batch pipeline (`experiments/bench_input.py`), less
than the 5,000 training images/s an accelerator is asked for (issue 4); from memory, 20,000 to
31,000. Decoded, CIFAR-10's 50,000 training images are 146 MiB. With
`config.data.cache_in_memory=True` the source is read once, at construction, into one uint8
(N, S, S, C) array and one int32 (N,) array; reads after that are views of them. The examples
are those of the source, so the batch stream is unchanged.
"""

import os
import time
from concurrent import futures

import numpy as np
from absl import logging

from diffusion_jax.data.arrays import ArraySource

# The decoded split may take at most this fraction of the host's physical memory.
MAX_MEMORY_FRACTION = 0.5


def host_memory_bytes() -> int:
    """This host's physical memory, or its cgroup's limit (a container's) when that is lower."""
    memory = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    for path in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            with open(path) as f:
                limit = f.read().strip()
        except OSError:
            continue
        if limit.isdigit():
            memory = min(memory, int(limit))
    return memory


class InMemorySource(ArraySource):
    """The examples of `source` ({"image": uint8 (S, S, C), "label": int32}), read once.

    `threads` read the source in parallel (default min(8, cpu count)); the first error a read
    raises is raised here, at construction. ValueError if the decoded images would take more
    than MAX_MEMORY_FRACTION of this host's memory. In a multi-process run every process reads
    the whole split: its batches are drawn from all of it.
    """

    def __init__(self, source, *, threads: int | None = None):
        n = len(source)
        if n == 0:
            raise ValueError("data.cache_in_memory: the source has no examples")
        image_shape = np.shape(source[0]["image"])
        nbytes = n * int(np.prod(image_shape))
        limit = int(MAX_MEMORY_FRACTION * host_memory_bytes())
        if nbytes > limit:
            raise ValueError(
                f"data.cache_in_memory: the {n:,} decoded images take {nbytes / 2**30:.1f} GiB, "
                f"more than {MAX_MEMORY_FRACTION:.0%} of this host's memory "
                f"({limit / MAX_MEMORY_FRACTION / 2**30:.1f} GiB); set "
                "data.cache_in_memory=False to read them from the source at every step"
            )
        images = np.empty((n, *image_shape), np.uint8)
        labels = np.empty((n,), np.int32)

        def read(chunk: range) -> int:
            for i in chunk:
                example = source[i]
                if np.shape(example["image"]) != image_shape:
                    raise ValueError(
                        f"example {i} has an image of shape {np.shape(example['image'])}, "
                        f"example 0 one of {image_shape}"
                    )
                images[i] = example["image"]
                labels[i] = example["label"]
            return len(chunk)

        workers = threads or min(8, os.cpu_count() or 1)
        size = max(1, min(1024, -(-n // (4 * workers))))
        logging.info("Reading %d examples (%.0f MiB decoded) into memory", n, nbytes / 2**20)
        start, done, reported = time.perf_counter(), 0, 0
        with futures.ThreadPoolExecutor(max_workers=workers) as pool:
            jobs = [pool.submit(read, range(i, min(i + size, n))) for i in range(0, n, size)]
            try:
                for job in futures.as_completed(jobs):
                    done += job.result()
                    if done - reported >= n / 10 and done < n:
                        reported = done
                        logging.info("  %d / %d examples read", done, n)
            except BaseException:
                for job in jobs:
                    job.cancel()
                raise
        logging.info("Read %d examples in %.1f s", n, time.perf_counter() - start)
        super().__init__(images, labels, source.num_classes)
