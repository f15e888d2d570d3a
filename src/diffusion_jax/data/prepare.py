"""One-time preparation of a tfds dataset in the array_record format training reads.

    python -m diffusion_jax.data.prepare --dataset=cifar10 [--data_dir=DIR]

Runs `tfds.builder(name, data_dir=DIR).download_and_prepare(file_format='array_record')`,
writing DIR/<name>/<version>/ (DIR defaults to tfds' own, $TFDS_DATA_DIR or
~/tensorflow_datasets). Training then reads it with no network and no TensorFlow.

What it needs:
- network access, to download the source files (once; they are cached under DIR/downloads);
- TensorFlow, for some builders: those that hand numpy images to an Image feature encode them
  with TensorFlow (cifar10 is one; `pip install tensorflow-cpu` for this step only). Builders
  that hand over files or PIL images do not need it;
- for datasets with manual downloads (e.g. some celeb_a mirrors), the files placed where the
  tfds error message says.
"""

from absl import app, flags, logging

DATASET = flags.DEFINE_string("dataset", None, "tfds name, e.g. cifar10, lsun/church_outdoor")
DATA_DIR = flags.DEFINE_string("data_dir", None, "tfds data directory (default: tfds' own)")


def prepare(name: str, data_dir: str | None = None) -> str:
    """Download and prepare `name` as array_record; returns the directory written."""
    import tensorflow_datasets as tfds

    builder = tfds.builder(name, data_dir=data_dir)
    if builder.is_prepared():
        logging.info("%s is already prepared at %s", name, builder.data_dir)
        return str(builder.data_dir)
    try:
        builder.download_and_prepare(file_format="array_record")
    except ModuleNotFoundError as e:
        if e.name != "tensorflow":
            raise
        raise RuntimeError(
            f"preparing {name!r} needs TensorFlow (its builder encodes images with it): "
            "pip install tensorflow-cpu, run this once, then training needs no TensorFlow"
        ) from e
    logging.info("prepared %s at %s", name, builder.data_dir)
    return str(builder.data_dir)


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    prepare(DATASET.value, DATA_DIR.value)


if __name__ == "__main__":
    flags.mark_flag_as_required("dataset")
    app.run(main)
