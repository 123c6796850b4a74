"""The configs ship inside the wheel: an installed dpbp composes its config without the tree."""

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                    "-q", "-w", str(out), str(ROOT)], check=True, timeout=300)
    return next(out.glob("dpbp-*.whl"))


def test_wheel_contains_every_config(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    for yaml in (ROOT / "conf").rglob("*.yaml"):
        assert f"dpbp/conf/{yaml.relative_to(ROOT / 'conf')}" in names, yaml


def test_installed_wheel_composes_and_validates_outside_the_tree(wheel, tmp_path):
    site = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target",
                    str(site), str(wheel)], check=True, timeout=300)
    code = (
        "import sys; sys.path.insert(0, sys.argv[1])\n"
        "import dpbp, pathlib\n"
        "assert pathlib.Path(dpbp.__file__).is_relative_to(sys.argv[1]), dpbp.__file__\n"
        "from hydra import compose, initialize_config_module\n"
        "from omegaconf import OmegaConf\n"
        "from dpbp.config import from_dict, validate\n"
        "with initialize_config_module(config_module='dpbp.conf', version_base='1.3'):\n"
        "    cfg = compose('train', overrides=['algo=fdg', 'data=cifar10', 'model=resnet110'])\n"
        "rc = from_dict(OmegaConf.to_container(cfg, resolve=True)); validate(rc)\n"
        "print(rc.algo.name, rc.data.name, rc.model)\n"
    )
    out = subprocess.run([sys.executable, "-c", code, str(site)], cwd=tmp_path,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["fdg", "cifar10", "resnet110"]
