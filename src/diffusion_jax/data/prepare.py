"""One-time preparation of a tfds dataset in the array_record format training reads.

    python -m diffusion_jax.data.prepare --dataset=cifar10 [--data_dir=DIR]

Runs `tfds.builder(name, data_dir=DIR).download_and_prepare(file_format='array_record')`,
writing DIR/<name>/<version>/ (DIR defaults to tfds' own, $TFDS_DATA_DIR or
~/tensorflow_datasets). Training then reads it with no network and no TensorFlow. Training
also calls `prepare` itself the first time it meets an unprepared dataset; this command is for
preparing ahead of time, or on another machine when the training one has no network.

What it needs:
- network access, to download the source files (once; they are cached under DIR/downloads);
- TensorFlow, for some builders: those that hand numpy images to an Image feature encode them
  with TensorFlow (cifar10 is one; `pip install tensorflow-cpu` for this step only). Builders
  that hand over files or PIL images do not need it;
- for datasets with manual downloads (e.g. some celeb_a mirrors), the files placed where the
  tfds error message says.
"""

import sys

from absl import app, flags, logging


class PrepareError(RuntimeError):
    """Preparing failed for a reason the user fixes outside this program (network, TensorFlow)."""


def prepare_command(name: str, data_dir: str | None) -> str:
    """The command line that prepares `name` into `data_dir`."""
    flag = f" --data_dir={data_dir}" if data_dir else ""
    return f"python -m diffusion_jax.data.prepare --dataset={name}{flag}"


def prepare(name: str, data_dir: str | None = None) -> str:
    """Download and prepare `name` as array_record; returns the directory written.

    tfds logs the download and conversion progress. Raises PrepareError when the download
    fails or the builder needs TensorFlow and it is not installed.
    """
    import tensorflow_datasets as tfds

    builder = tfds.builder(name, data_dir=data_dir)
    if builder.is_prepared():
        logging.info("%s is already prepared at %s", name, builder.data_dir)
        return str(builder.data_dir)
    logging.info(
        "preparing %s at %s (array_record): downloading its source files once, then converting",
        name,
        builder.data_dir,
    )
    try:
        builder.download_and_prepare(file_format="array_record")
    except ModuleNotFoundError as e:
        if e.name != "tensorflow":
            raise
        raise PrepareError(
            f"preparing {name!r} needs TensorFlow (its builder encodes images with it): "
            "pip install tensorflow-cpu, prepare once, then training needs no TensorFlow"
        ) from e
    except (OSError, tfds.download.DownloadError) as e:
        # requests' and urllib3's connection errors are OSErrors; tfds wraps some in its own.
        reason = " ".join(str(e).split())[:300]
        raise PrepareError(f"downloading {name!r} failed ({type(e).__name__}: {reason})") from e
    logging.info("prepared %s at %s", name, builder.data_dir)
    return str(builder.data_dir)


def define_flags() -> None:
    flags.DEFINE_string("dataset", None, "tfds name, e.g. cifar10, lsun/church_outdoor")
    flags.DEFINE_string("data_dir", None, "tfds data directory (default: tfds' own)")
    flags.mark_flag_as_required("dataset")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    try:
        prepare(flags.FLAGS.dataset, flags.FLAGS.data_dir)
    except PrepareError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    define_flags()
    app.run(main)
