"""`create_source(config.data, split)`: the one entry point from config to a data source.

A source is random access: len(source) and source[i] -> {"image": uint8 (S, S, C),
"label": int32}, with S = image_size and C = num_channels; it also has `num_classes`.

config.data fields (read with .get, so a ConfigDict or a plain dict both work):
  dataset       'digits' | 'photos' | 'folder:<path>' | 'folder' (path in data_dir) | a tfds
                name such as 'cifar10', 'celeb_a', 'lsun/church_outdoor'
  image_size    int > 0, output height and width
  num_channels  1 (grayscale) or 3 (RGB)
  data_dir      tfds data directory (default: tfds' own), or the folder for dataset='folder'
  on_corrupt    image folders only: 'skip' (default) or 'error'
  label_key     tfds only: the feature holding the class label (default 'label')
  scan_threads  image folders only: threads decoding every file once at construction
                (default min(8, cpu count))
  cache_in_memory  read every example once, at construction, and serve the decoded arrays
                (default False; see `cache.InMemorySource`)

Embedded sources (no download): 'digits' (scikit-learn's 8x8 digits, label the digit) and
'photos' (32x32 RGB patches of scikit-learn's two sample photographs, label the photo's index
0 or 1; see `photos`). Both take image_size and num_channels as above and have the splits
'train' | 'test' | 'all'.
"""

from diffusion_jax.data import images as images_lib
from diffusion_jax.data.cache import InMemorySource
from diffusion_jax.data.digits import SPLITS as DIGITS_SPLITS
from diffusion_jax.data.digits import DigitsSource
from diffusion_jax.data.folder import FolderSource
from diffusion_jax.data.photos import SPLITS as PHOTOS_SPLITS
from diffusion_jax.data.photos import PhotoPatchSource

FOLDER_PREFIX = "folder:"


def _image_size(cfg) -> int:
    size = cfg.get("image_size")
    if isinstance(size, bool) or not isinstance(size, int) or size <= 0:
        raise ValueError(f"data.image_size must be a positive int, got {size!r}")
    return size


def _num_channels(cfg) -> int:
    channels = cfg.get("num_channels")
    if isinstance(channels, bool) or channels not in images_lib.NUM_CHANNELS:
        raise ValueError(
            f"data.num_channels must be one of {images_lib.NUM_CHANNELS}, got {channels!r}"
        )
    return channels


def create_source(cfg, split: str = "train"):
    """Build the random-access source that config.data describes, for one split.

    Splits: digits and photos 'train' | 'test' | 'all' (a fixed split); tfds any split string it
    knows ('train', 'test', 'train[:90%]', ...); an image folder is one split, 'train'.
    """
    cache = cfg.get("cache_in_memory", False)
    if not isinstance(cache, bool):
        raise ValueError(f"data.cache_in_memory must be True or False, got {cache!r}")
    source = _create_source(cfg, split)
    return InMemorySource(source) if cache else source


def _create_source(cfg, split: str):
    dataset = cfg.get("dataset")
    if not isinstance(dataset, str) or not dataset:
        raise ValueError(
            "data.dataset must be 'digits', 'photos', 'folder:<path>' (or 'folder' with "
            f"data.data_dir) or a tfds dataset name, got {dataset!r}"
        )
    image_size, num_channels = _image_size(cfg), _num_channels(cfg)
    data_dir = cfg.get("data_dir")

    if dataset == "digits":
        if split not in DIGITS_SPLITS:
            raise ValueError(f"digits split must be one of {DIGITS_SPLITS}, got {split!r}")
        return DigitsSource(split, image_size=image_size, num_channels=num_channels)

    if dataset == "photos":
        if split not in PHOTOS_SPLITS:
            raise ValueError(f"photos split must be one of {PHOTOS_SPLITS}, got {split!r}")
        return PhotoPatchSource(split, image_size=image_size, num_channels=num_channels)

    if dataset == "folder" or dataset.startswith(FOLDER_PREFIX):
        root = dataset[len(FOLDER_PREFIX) :] if dataset != "folder" else data_dir
        if not root:
            raise ValueError(
                "an image folder needs a path: data.dataset='folder:/path/to/images', "
                "or data.dataset='folder' with data.data_dir='/path/to/images'"
            )
        if split != "train":
            raise ValueError(
                f"an image folder is a single split, 'train'; got split {split!r}. To evaluate "
                "on held-out images, point data.dataset at a folder holding them."
            )
        return FolderSource(
            root,
            image_size=image_size,
            num_channels=num_channels,
            on_corrupt=cfg.get("on_corrupt", "skip"),
            scan_threads=cfg.get("scan_threads"),
        )

    # Imported here: tensorflow_datasets takes about a second to import, digits runs need none.
    from diffusion_jax.data.tfds_source import TfdsSource

    return TfdsSource(
        dataset,
        split,
        image_size=image_size,
        num_channels=num_channels,
        data_dir=data_dir,
        label_key=cfg.get("label_key", "label"),
    )
