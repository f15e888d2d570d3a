"""Import diffusers' UNet2DModel checkpoints (config.json + diffusion_pytorch_model.safetensors).

Weights are read with safetensors.numpy only (never pickle). Every tensor is converted and
shape-checked against the model built from config.json, and the import fails if any tensor is
missing or left unused. Tensors are converted from PyTorch layouts: conv OIHW -> HWIO, Linear
(out, in) -> (in, out), GroupNorm weight -> scale. Attention weights are accepted under their
current names (to_q, to_k, to_v, to_out.0) and their legacy ones (query, key, value, proj_attn).

As a command, `python -m diffusion_jax.interop.diffusers --input=DIR --workdir=W` turns a
UNet2DModel folder into a workdir that the sample and evaluate CLIs (and train, to fine-tune)
accept: config.json and a step-0 checkpoint whose params and EMA params are the imported ones.
"""

import importlib.util
import json
from collections.abc import Mapping
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from flax import traverse_util
from safetensors.numpy import load_file

from diffusion_jax import checkpointing, cli, training
from diffusion_jax.models import create_model
from diffusion_jax.models.layers import NORM_EPS
from diffusion_jax.validation import validate_config

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "diffusion_pytorch_model.safetensors"

# UNet2DModel.__init__ defaults (diffusers 0.42): they apply to keys missing from config.json,
# exactly as diffusers applies them when it loads the same folder.
DIFFUSERS_DEFAULTS = {
    "sample_size": None,
    "in_channels": 3,
    "out_channels": 3,
    "center_input_sample": False,
    "time_embedding_type": "positional",
    "time_embedding_dim": None,
    "freq_shift": 0,
    "flip_sin_to_cos": True,
    "down_block_types": ("DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D"),
    "mid_block_type": "UNetMidBlock2D",
    "up_block_types": ("AttnUpBlock2D", "AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
    "block_out_channels": (224, 448, 672, 896),
    "layers_per_block": 2,
    "mid_block_scale_factor": 1,
    "downsample_padding": 1,
    "downsample_type": "conv",
    "upsample_type": "conv",
    "dropout": 0.0,
    "act_fn": "silu",
    "attention_head_dim": 8,
    "norm_num_groups": 32,
    "attn_norm_num_groups": None,
    "norm_eps": 1e-5,
    "resnet_time_scale_shift": "default",
    "add_attention": True,
    "class_embed_type": None,
    "num_class_embeds": None,
    "num_train_timesteps": None,
}

# Options our UNet implements only at one value: key -> allowed values.
_FIXED = {
    "center_input_sample": (False,),
    "time_embedding_type": ("positional",),
    "mid_block_type": ("UNetMidBlock2D",),
    "mid_block_scale_factor": (1,),
    "downsample_type": ("conv",),
    "upsample_type": ("conv",),
    "act_fn": ("silu", "swish"),
    "resnet_time_scale_shift": ("default",),
    "add_attention": (True,),
    "class_embed_type": (None,),
}
_DOWNSAMPLE_PADDING = {0: "same", 1: "symmetric"}
_ATTN_BLOCKS = {"DownBlock2D": False, "AttnDownBlock2D": True}
_UP_ATTN_BLOCKS = {"UpBlock2D": False, "AttnUpBlock2D": True}
# Module lists in the diffusers state dict ("down_blocks.0" <-> our "down_blocks_0").
_LIST_NAMES = ("down_blocks", "up_blocks", "resnets", "attentions", "downsamplers", "upsamplers")
_LEGACY_ATTN = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
# Our class table has one row more than diffusers' num_class_embeds = K: row K, the null label
# of classifier-free guidance, which the imported model never learnt. It is imported as zeros,
# so the null label adds nothing to the time embedding; labels 0..K-1 are diffusers' own.
_CLASS_TABLE = ("class_embedding", "embedding")


def unet_config_from_diffusers(cfg: Mapping) -> dict:
    """Map a UNet2DModel config (config.json as a dict) to our model config (name 'unet').

    Raises ValueError naming the option when the diffusers model is not one our UNet can
    represent exactly.
    """
    class_name = cfg.get("_class_name", "UNet2DModel")
    if class_name != "UNet2DModel":
        raise ValueError(f"diffusers config: _class_name={class_name!r}; only UNet2DModel")
    unknown = sorted(k for k in cfg if not k.startswith("_") and k not in DIFFUSERS_DEFAULTS)
    if unknown:
        raise ValueError(f"diffusers config: unsupported key(s) {unknown}")
    c = {**DIFFUSERS_DEFAULTS, **{k: v for k, v in cfg.items() if not k.startswith("_")}}
    for key, allowed in _FIXED.items():
        if c[key] not in allowed:
            raise ValueError(
                f"diffusers config: {key}={c[key]!r} is not supported; allowed: "
                f"{', '.join(map(repr, allowed))}"
            )
    if c["attn_norm_num_groups"] not in (None, c["norm_num_groups"]):
        raise ValueError(
            f"diffusers config: attn_norm_num_groups={c['attn_norm_num_groups']!r} is not "
            f"supported; allowed: None or norm_num_groups ({c['norm_num_groups']})"
        )
    if c["downsample_padding"] not in _DOWNSAMPLE_PADDING:
        raise ValueError(
            f"diffusers config: downsample_padding={c['downsample_padding']!r}; allowed: 0, 1"
        )

    size = c["sample_size"]
    if isinstance(size, list | tuple):
        if len(size) != 2 or size[0] != size[1]:
            raise ValueError(f"diffusers config: sample_size={size!r}; only square images")
        size = size[0]
    if size is None:
        raise ValueError("diffusers config: sample_size is required")

    widths = list(c["block_out_channels"])
    down, up = list(c["down_block_types"]), list(c["up_block_types"])
    if not (len(widths) == len(down) == len(up)):
        raise ValueError(
            f"diffusers config: block_out_channels={widths}, down_block_types={down} and "
            f"up_block_types={up} must have the same length"
        )
    ch = widths[0]
    if any(w % ch for w in widths):
        raise ValueError(
            f"diffusers config: block_out_channels={widths} are not all multiples of the first "
            f"({ch}), so no (ch, ch_mult) describes them"
        )
    for block in down:
        if block not in _ATTN_BLOCKS:
            raise ValueError(
                f"diffusers config: down block type {block!r} is not supported; allowed: "
                f"{', '.join(map(repr, _ATTN_BLOCKS))}"
            )
    for block in up:
        if block not in _UP_ATTN_BLOCKS:
            raise ValueError(
                f"diffusers config: up block type {block!r} is not supported; allowed: "
                f"{', '.join(map(repr, _UP_ATTN_BLOCKS))}"
            )
    down_attn = [_ATTN_BLOCKS[b] for b in down]
    up_attn = [_UP_ATTN_BLOCKS[b] for b in reversed(up)]
    if down_attn != up_attn:
        raise ValueError(
            f"diffusers config: attention in down_block_types={down} and up_block_types={up} is "
            "not mirrored; our UNet uses attention at the same resolutions on both paths"
        )
    if c["time_embedding_dim"] not in (None, 4 * ch):
        raise ValueError(
            f"diffusers config: time_embedding_dim={c['time_embedding_dim']!r}; allowed: None "
            f"or 4 * block_out_channels[0] ({4 * ch})"
        )
    if size % 2 ** (len(widths) - 1):
        raise ValueError(
            f"diffusers config: sample_size={size} is not divisible by 2**{len(widths) - 1}"
        )
    eps, shift = c["norm_eps"], c["freq_shift"]
    if not isinstance(c["flip_sin_to_cos"], bool):
        raise ValueError(
            f"diffusers config: flip_sin_to_cos={c['flip_sin_to_cos']!r}; allowed: True or False"
        )
    if not _is_number(eps) or not eps > 0:
        raise ValueError(f"diffusers config: norm_eps={eps!r}; allowed: a positive number")
    if not _is_number(shift) or not shift < ch // 2:
        raise ValueError(
            f"diffusers config: freq_shift={shift!r}; allowed: a number below "
            f"block_out_channels[0] // 2 ({ch // 2})"
        )
    head_dim = c["attention_head_dim"]
    # UNet2DModel gives each attention block of C channels C // attention_head_dim heads of
    # attention_head_dim channels (one head of C when None); the mid block always attends.
    attn_widths = sorted({w for w, a in zip(widths, down_attn, strict=True) if a} | {widths[-1]})
    if head_dim is not None and (
        not _is_int(head_dim) or head_dim <= 0 or any(w % head_dim for w in attn_widths)
    ):
        raise ValueError(
            f"diffusers config: attention_head_dim={head_dim!r} is not supported; allowed: None "
            f"or a positive integer dividing the widths of the attention blocks {attn_widths}"
        )
    classes = c["num_class_embeds"]
    if classes is not None and (not _is_int(classes) or classes <= 0):
        raise ValueError(
            f"diffusers config: num_class_embeds={classes!r}; allowed: None or a positive integer"
        )
    return {
        "name": "unet",
        "ch": ch,
        "ch_mult": tuple(w // ch for w in widths),
        "num_res_blocks": c["layers_per_block"],
        "attn_resolutions": tuple(size // 2**i for i, a in enumerate(down_attn) if a),
        "image_size": size,
        "in_channels": c["in_channels"],
        "out_channels": c["out_channels"],
        "dropout": float(c["dropout"]),
        "resamp_with_conv": True,
        "downsample_padding": _DOWNSAMPLE_PADDING[c["downsample_padding"]],
        "num_groups": c["norm_num_groups"],
        "norm_eps": float(eps),
        "num_heads": 1,
        "num_head_channels": head_dim,
        "flip_sin_to_cos": c["flip_sin_to_cos"],
        "freq_shift": float(shift),
        # The imported class table gains a zero null-label row (see convert_unet2d_state_dict).
        "num_classes": classes or 0,
    }


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


def diffusers_config_from_unet(model_cfg: Mapping) -> dict:
    """Our UNet config -> the UNet2DModel keyword arguments of the identical network.

    The inverse of unet_config_from_diffusers (benchmarks build the PyTorch peer with it).
    Raises ValueError for what UNet2DModel cannot express: class or image conditioning, and
    several attention heads without num_head_channels.
    """
    cfg = dict(model_cfg.to_dict() if hasattr(model_cfg, "to_dict") else model_cfg)
    if cfg.get("name", "unet") != "unet":
        raise ValueError(f"diffusers_config_from_unet: name={cfg['name']!r}; only 'unet'")
    for key in ("num_classes", "cond_channels"):
        if cfg.get(key, 0):
            raise ValueError(
                f"diffusers_config_from_unet: {key}={cfg[key]} has no UNet2DModel form"
            )
    if not cfg.get("resamp_with_conv", True):
        raise ValueError(
            "diffusers_config_from_unet: resamp_with_conv=False has no UNet2DModel form"
        )
    head_channels = cfg.get("num_head_channels")
    if head_channels is None and cfg.get("num_heads", 1) != 1:
        raise ValueError(
            f"diffusers_config_from_unet: num_heads={cfg['num_heads']}; UNet2DModel sets heads "
            "by num_head_channels (attention_head_dim) or uses one head"
        )
    size, ch = cfg["image_size"], cfg["ch"]
    attn = [size // 2**i in tuple(cfg["attn_resolutions"]) for i in range(len(cfg["ch_mult"]))]
    padding = {v: k for k, v in _DOWNSAMPLE_PADDING.items()}[cfg.get("downsample_padding", "same")]
    return {
        "sample_size": size,
        "in_channels": cfg["in_channels"],
        "out_channels": cfg.get("out_channels") or cfg["in_channels"],
        "block_out_channels": tuple(ch * m for m in cfg["ch_mult"]),
        "down_block_types": tuple("AttnDownBlock2D" if a else "DownBlock2D" for a in attn),
        "up_block_types": tuple("AttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attn)),
        "layers_per_block": cfg["num_res_blocks"],
        "dropout": float(cfg.get("dropout", 0.0)),
        "norm_num_groups": cfg.get("num_groups", 32),
        "norm_eps": cfg.get("norm_eps", NORM_EPS),
        "freq_shift": cfg.get("freq_shift", 1.0),
        "flip_sin_to_cos": cfg.get("flip_sin_to_cos", False),
        "attention_head_dim": head_channels,
        "downsample_padding": padding,
    }


def _diffusers_name(path: tuple[str, ...]) -> str:
    """Our parameter path -> diffusers module path, e.g. ('down_blocks_0', 'resnets_1', 'conv1')
    -> 'down_blocks.0.resnets.1.conv1'."""
    parts = []
    for p in path:
        head, _, index = p.rpartition("_")
        if (head in _LIST_NAMES or head == "to_out") and index.isdigit():
            parts += [head, index]
        else:
            parts.append(p)
    return ".".join(parts)


def _candidates(module: str) -> list[str]:
    """Names a module may have in the file: current, then the legacy attention name."""
    for current, legacy in _LEGACY_ATTN.items():
        if module.endswith("." + current):
            return [module, module[: -len(current)] + legacy]
    return [module]


def _torch_shape(leaf: str, shape: tuple[int, ...]) -> tuple[int, ...]:
    """The PyTorch shape of a tensor that becomes our parameter `leaf` of `shape`."""
    if leaf == "kernel" and len(shape) == 4:
        h, w, i, o = shape
        return (o, i, h, w)
    if leaf == "kernel" and len(shape) == 2:
        return shape[::-1]
    return shape


def _to_flax(leaf: str, arr: np.ndarray) -> np.ndarray:
    if leaf == "kernel" and arr.ndim == 4:
        return arr.transpose(2, 3, 1, 0)
    if leaf == "kernel" and arr.ndim == 2:
        return arr.T
    return arr


def convert_unet2d_state_dict(tensors: Mapping[str, np.ndarray], abstract_params) -> dict:
    """diffusers UNet2DModel tensors -> our params tree shaped like `abstract_params`.

    Raises ValueError naming the tensor when one is missing, has the wrong shape, appears under
    both its current and legacy name, or is not used. The class table gains a zero row for the
    null label (_CLASS_TABLE).
    """
    flat = traverse_util.flatten_dict(abstract_params)
    params, used, missing = {}, set(), []
    for path, expected in flat.items():
        module, leaf = _diffusers_name(path[:-1]), path[-1]
        torch_leaf = "bias" if leaf == "bias" else "weight"
        found = [f"{m}.{torch_leaf}" for m in _candidates(module)]
        found = [k for k in found if k in tensors]
        if not found:
            missing.append(f"{module}.{torch_leaf}")
            continue
        if len(found) > 1:
            raise ValueError(f"diffusers weights: both {found[0]!r} and {found[1]!r} are present")
        key = found[0]
        arr = np.asarray(tensors[key], dtype=np.float32)
        want = _torch_shape(leaf, tuple(expected.shape))
        if path == _CLASS_TABLE:
            want = (want[0] - 1, *want[1:])
        if arr.shape != want:
            raise ValueError(
                f"diffusers weights: tensor {key!r} has shape {arr.shape}; the model built from "
                f"config.json expects {want}"
            )
        if path == _CLASS_TABLE:
            arr = np.concatenate([arr, np.zeros_like(arr[:1])])
        params[path] = _to_flax(leaf, arr)
        used.add(key)
    if missing:
        raise ValueError(f"diffusers weights: missing tensor(s) {missing}")
    unused = sorted(set(tensors) - used)
    if unused:
        raise ValueError(f"diffusers weights: tensor(s) not used by the model: {unused}")
    return traverse_util.unflatten_dict(params)


def load_unet2d(path):
    """Load a diffusers UNet2DModel folder (config.json + diffusion_pytorch_model.safetensors).

    Returns (model, params): apply as model.apply({"params": params}, x_nhwc, t), adding
    y=labels for a class-conditional model (num_class_embeds=K: labels 0..K-1 as in diffusers,
    K the null label). For a pipeline folder pass its unet/ subfolder.
    """
    path = Path(path)
    config_file, weights_file = path / CONFIG_FILE, path / WEIGHTS_FILE
    for f in (config_file, weights_file):
        if not f.is_file():
            raise FileNotFoundError(
                f"{f} not found: expected a diffusers UNet2DModel folder holding {CONFIG_FILE} "
                f"and {WEIGHTS_FILE} (safetensors only; for a pipeline, its unet/ subfolder)"
            )
    model = create_model(unet_config_from_diffusers(json.loads(config_file.read_text())))
    b, s = 1, model.image_size
    labels = jax.ShapeDtypeStruct((b,), jnp.int32) if model.num_classes else None
    abstract = jax.eval_shape(
        model.init,
        jax.random.key(0),
        jax.ShapeDtypeStruct((b, s, s, model.in_channels), jnp.float32),
        jax.ShapeDtypeStruct((b,), jnp.int32),
        y=labels,
    )["params"]
    params = convert_unet2d_state_dict(load_file(weights_file), abstract)
    return model, jax.tree.map(jnp.asarray, params)


# The repository's configs/ (absent from an installed wheel: then pass --base_config).
DEFAULT_BASE_CONFIG = Path(__file__).resolve().parents[3] / "configs" / "ddpm_cifar.py"
# The model fields a workdir's config.model takes from the import; training.model_config adds
# image_size, in_channels and out_channels from config.data and config.diffusion.
_MODEL_FIELDS = (
    "name",
    "ch",
    "ch_mult",
    "num_res_blocks",
    "attn_resolutions",
    "dropout",
    "resamp_with_conv",
    "downsample_padding",
    "num_groups",
    "norm_eps",
    "num_heads",
    "num_head_channels",
    "flip_sin_to_cos",
    "freq_shift",
)


def _load_config_file(path):
    path = Path(path)
    if not path.is_file():
        raise cli.UserError(f"base config {path} not found: pass --base_config=path/to/config.py")
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


def workdir_config(unet: Mapping, config, dataset: str):
    """`config` (an experiment config, updated in place) with the imported UNet and the
    published DDPM models' diffusion settings: linear betas, T = 1000, eps, sigma_t^2 = beta_t."""
    if unet["out_channels"] != unet["in_channels"]:
        raise cli.UserError(
            f"the UNet outputs {unet['out_channels']} channels for {unet['in_channels']} input "
            "channels: only eps-prediction models with a fixed variance (equal counts) import "
            "as a DDPM workdir"
        )
    if unet["num_classes"]:
        raise cli.UserError(
            f"num_class_embeds={unet['num_classes']}: a class-conditional UNet imports in memory "
            "(load_unet2d) but not as a workdir, since training configs take no class labels yet"
        )
    for field in _MODEL_FIELDS:
        config.model[field] = unet[field]
    config.data.dataset = dataset
    config.data.image_size = unet["image_size"]
    config.data.num_channels = unet["in_channels"]
    config.diffusion.schedule = "linear"
    config.diffusion.num_timesteps = 1000
    config.diffusion.parameterization = "eps"
    config.diffusion.var_type = "fixed_large"
    validate_config(config)
    return config


def import_to_workdir(input_dir, workdir, *, dataset="cifar10", base_config=None) -> dict:
    """Write `workdir` (config.json, checkpoints/0) from a diffusers UNet2DModel folder."""
    workdir = Path(workdir)
    if (workdir / "config.json").exists() or (workdir / "checkpoints").exists():
        raise cli.UserError(f"workdir {workdir} already holds a run: choose a new --workdir")
    try:
        _, params = load_unet2d(input_dir)
        unet = unet_config_from_diffusers(json.loads((Path(input_dir) / CONFIG_FILE).read_text()))
    except (FileNotFoundError, ValueError) as e:
        raise cli.UserError(str(e)) from None
    base = _load_config_file(DEFAULT_BASE_CONFIG if base_config is None else base_config)
    config = workdir_config(unet, base, dataset)
    optimizer, _ = training.make_optimizer(config)
    state = training.new_state(params, optimizer)
    ckpt = checkpointing.Checkpointer(
        workdir / "checkpoints", keep=config.training.keep_checkpoints
    )
    try:
        ckpt.save(0, state, {"imported_from": str(Path(input_dir).absolute())})
    finally:
        ckpt.close()
    # Written last: a workdir with a config.json always has its checkpoint.
    (workdir / "config.json").write_text(config.to_json(indent=2))
    num_params = sum(x.size for x in jax.tree.leaves(params))
    return {"workdir": str(workdir), "num_params": num_params, "dataset": dataset}


def define_flags() -> None:
    flags.DEFINE_string("input", None, "A diffusers UNet2DModel folder (a pipeline's unet/).")
    flags.DEFINE_string("workdir", None, "The workdir to create.")
    flags.DEFINE_string(
        "dataset", "cifar10", "The model's dataset, recorded as data.dataset (for FID/NLL)."
    )
    flags.DEFINE_string(
        "base_config",
        None,
        f"Experiment config file to start from (default {DEFAULT_BASE_CONFIG}).",
    )


def main(argv) -> None:
    del argv
    cli.quiet_libraries()
    f = flags.FLAGS
    with cli.user_errors():
        cli.require_flags("input", "workdir")
        record = import_to_workdir(f.input, f.workdir, dataset=f.dataset, base_config=f.base_config)
    print(json.dumps(record))


if __name__ == "__main__":
    define_flags()
    app.run(main)
