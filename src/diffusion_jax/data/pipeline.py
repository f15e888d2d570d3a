"""Host-local uint8 batches: deterministic, sharded per host, resumable by step number.

The example stream. Position g = 0, 1, 2, ... holds source example perm_e[g mod N], where N
is the source length, e = g // N is the epoch and perm_e a permutation drawn from (seed, e)
(grain's `shuffle` then `repeat`, which reshuffles every epoch deterministically). Epochs are
consecutive runs of N positions: every example appears exactly once per epoch, none is
dropped, and a global batch may straddle two epochs.

Batches. Global batch s is positions [s*G, (s+1)*G) for global batch size G. With P hosts,
host p takes the contiguous slice [s*G + p*L, s*G + (p+1)*L), L = G / P: the local batches
are disjoint and, concatenated in process order, are the global batch. With random_flip, the
example at position g is flipped left-right when a Philox generator keyed by (seed, g) says
so (grain's `random_map`), independently of P.

So local batch (s, p) is a pure function of (seed, s, p, P, dataset): resuming is
`start_step=step`, there is no iterator state to checkpoint. The user seed is hashed
(numpy SeedSequence) into the shuffle and flip seeds, so nearby seeds give unrelated streams
(grain seeds epoch e with shuffle_seed + e).
"""

from collections.abc import Iterator

import grain
import numpy as np


def _random_flip(example: dict, rng: np.random.Generator) -> dict:
    if rng.random() < 0.5:
        return {**example, "image": np.ascontiguousarray(example["image"][:, ::-1])}
    return example


def _check_int(name: str, value, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")


def create_batch_dataset(
    source,
    *,
    global_batch_size: int,
    seed: int,
    process_index: int = 0,
    process_count: int = 1,
    random_flip: bool = False,
) -> grain.MapDataset:
    """Random-access dataset of this host's batches: element s is local batch s.

    Each batch is {"image": uint8 (L, H, W, C), "label": int32 (L,)} (every key the source
    gives is batched), L = global_batch_size // process_count. The dataset is infinite.
    """
    _check_int("global_batch_size", global_batch_size, 1)
    _check_int("process_count", process_count, 1)
    _check_int("process_index", process_index, 0)
    _check_int("seed", seed, 0)
    if process_index >= process_count:
        raise ValueError(f"process_index {process_index} must be < process_count {process_count}")
    if global_batch_size % process_count:
        raise ValueError(
            f"global_batch_size {global_batch_size} is not divisible by process_count "
            f"{process_count}: every host must get the same number of examples"
        )
    if global_batch_size > len(source):
        raise ValueError(
            f"global_batch_size {global_batch_size} is larger than the dataset "
            f"({len(source)} examples)"
        )
    local_batch_size = global_batch_size // process_count
    shuffle_seed, flip_seed = (int(x) for x in np.random.SeedSequence(seed).generate_state(2))

    ds = grain.MapDataset.source(source).shuffle(seed=shuffle_seed).repeat()
    if random_flip:
        ds = ds.random_map(_random_flip, seed=flip_seed)
    # Consecutive chunks of L positions; global batch s is chunks s*P .. s*P + P - 1.
    ds = ds.batch(local_batch_size, drop_remainder=True)
    return ds[process_index::process_count]


def create_batches(
    source,
    *,
    global_batch_size: int,
    seed: int,
    start_step: int = 0,
    process_index: int = 0,
    process_count: int = 1,
    random_flip: bool = False,
    num_threads: int = 2,
    prefetch_buffer_size: int = 4,
) -> Iterator[dict]:
    """Infinite iterator over this host's batches, starting at global step `start_step`.

    Batches are made by `num_threads` threads (0: in the calling thread) and up to
    `prefetch_buffer_size` are read ahead. Errors raised while reading (a file that vanished)
    surface here, in next(). See `create_batch_dataset` for the contents.
    """
    _check_int("start_step", start_step, 0)
    ds = create_batch_dataset(
        source,
        global_batch_size=global_batch_size,
        seed=seed,
        process_index=process_index,
        process_count=process_count,
        random_flip=random_flip,
    )
    read_options = grain.ReadOptions(
        num_threads=num_threads, prefetch_buffer_size=prefetch_buffer_size
    )
    return iter(ds[start_step:].to_iter_dataset(read_options))
