"""Experiment configs: every file and variant validates, shared values are one value, variants
are named and checked, and the CLI takes `file.py:variant`."""

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

from diffusion_jax import models, training, workdir
from diffusion_jax.cli import UserError
from diffusion_jax.config import base_config, load_config, override
from diffusion_jax.validation import validate_config

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.py"))


def load(path: Path):
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def all_variants():
    for path in CONFIGS:
        module = load(path)
        for arg in [None, *getattr(module, "VARIANTS", {})]:
            yield pytest.param(module, arg, id=f"{path.stem}:{arg or ''}")


@pytest.mark.parametrize("module,arg", list(all_variants()))
def test_every_config_and_variant_validates(module, arg):
    config = module.get_config(arg)
    validate_config(config)
    # config.model completed with what follows from the data and the diffusion settings (the
    # output and conditioning channels) builds the model.
    model = models.create_model(training.model_config(config))
    assert model.image_size == config.data.image_size
    assert model.in_channels == config.data.num_channels


def test_variants_apply_in_order_and_unknown_names_are_refused():
    digits = load(next(p for p in CONFIGS if p.stem == "ddpm_digits"))
    config = digits.get_config("v,cosine")
    assert (config.diffusion.parameterization, config.diffusion.schedule) == ("v", "cosine")
    assert digits.get_config().diffusion.parameterization == "eps"
    with pytest.raises(ValueError, match="unknown config variant 'vee'; this config has: x0, v"):
        digits.get_config("vee")


def test_load_config_reads_a_file_and_variant_as_the_cli_does():
    path = next(p for p in CONFIGS if p.stem == "ddpm_digits")
    assert load_config(str(path)).to_json() == load(path).get_config().to_json()
    assert load_config(f"{path}:x0").diffusion.parameterization == "x0"
    with pytest.raises(ValueError, match="config file 'configs/nope.py' does not exist"):
        load_config("configs/nope.py:v")


def test_model_shape_fields_follow_the_data():
    config = base_config()
    config.data.image_size = 16
    override(config, {"data.num_channels": 1})
    assert (config.model.image_size, config.model.in_channels) == (16, 1)
    assert config.to_dict()["model"]["image_size"] == 16
    with pytest.raises(ValueError, match="no config field 'data.image_sise'"):
        override(config, {"data.image_sise": 8})


def test_cli_takes_a_variant_and_names_a_bad_one(tmp_path):
    cmd = [sys.executable, "-m", "diffusion_jax.train", f"--workdir={tmp_path / 'w'}"]
    bad = subprocess.run(
        [*cmd, "--config=configs/ddpm_digits.py:vee"],
        capture_output=True,
        text=True,
        cwd=Path(__file__).resolve().parents[1],
        timeout=120,
    )
    assert bad.returncode == 2, bad.stderr[-2000:]
    assert bad.stderr.strip().splitlines()[-1].startswith("error: ")
    last = bad.stderr.strip().splitlines()[-1]
    assert "unknown config variant 'vee'; this config has: x0, v" in last
    assert "Traceback" not in last


def test_resuming_refuses_another_noise_conditioning_but_reads_configs_written_before_it():
    """The network's time input means a step index or a noise level: same parameter shapes,
    another model. A config.json without the field (written before it existed) is "timestep"."""
    config = load_config(str(CONFIGS[0].parent / "ddpm_digits.py"))
    saved = json.loads(config.to_json())
    workdir.check_workdir_config("W", saved, config)
    del saved["diffusion"]["noise_conditioning"]
    workdir.check_workdir_config("W", saved, config)
    override(config, {"diffusion.noise_conditioning": "sqrt_alpha_bar"})
    with pytest.raises(UserError, match="noise_conditioning='timestep' but this config has"):
        workdir.check_workdir_config("W", saved, config)
