"""What `pip install .` puts into an environment: one import name, `matryoshka_sae`, and the console
scripts; and what the repository root holds: the user's module names as the very same modules.

The wheel is built from a copy of the project's files (nothing is written into the checkout) and
installed into a fresh virtual environment beside PyPI's `distributed` (Dask), whose package folder
would shadow a top-level module of the same name. The fresh environment borrows this environment's
installed packages (torch, transformer_lens, ...) through a .pth file placed after its own
site-packages, so that only the wheel and `distributed` are installed.
"""

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest
import tomllib

REPO = Path(__file__).resolve().parents[1]
USER_MODULES = ("config", "sae", "training", "activation_store", "transcoder_activation_store")


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """The project's wheel, built without touching the checkout."""
    source = tmp_path_factory.mktemp("source")
    for name in ("pyproject.toml", "requirements.txt", "README.md", "LICENSE"):
        shutil.copy(REPO / name, source / name)
    shutil.copytree(
        REPO / "matryoshka_sae",
        source / "matryoshka_sae",
        ignore=shutil.ignore_patterns("__pycache__"),
    )
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--quiet",
            "--no-deps",
            "--no-build-isolation",
            "-w",
            str(out),
            str(source),
        ],
        check=True,
        capture_output=True,
        cwd=out,
    )
    (path,) = out.glob("matryoshka_sae-*.whl")
    return path


def test_the_wheel_installs_one_import_name_and_every_command(wheel):
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
        entry_points = next(
            archive.read(n).decode() for n in names if n.endswith("entry_points.txt")
        )
    top_level = {
        name.split("/")[0] for name in names if not name.split("/")[0].endswith(".dist-info")
    }
    assert top_level == {"matryoshka_sae"}
    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    for command in (
        "sae-train",
        "sae-train-gemma",
        "sae-train-clt",
        "sae-export",
        "sae-inspect",
        "sae-evaluate",
        "sae-trace",
        "sae-cache-activations",
    ):
        assert command in scripts and f"{command} = {scripts[command]}" in entry_points


ONE_STEP = """
import importlib.util, json, sys
import torch
import matryoshka_sae.training as training
from matryoshka_sae.config import get_default_cfg, post_init_cfg
from matryoshka_sae.sae import create_sae

cfg = get_default_cfg()
cfg.update(model_name="gpt2", dict_size=64, top_k=4, batch_size=16, device="cpu")
cfg = post_init_cfg(cfg)
sae = create_sae(cfg)
optimizer = training.make_optimizer(sae, cfg)
torch.manual_seed(0)
x = torch.randn(16, 768)
sae.initialize_from_batch(x)
before = sae.W_enc.detach().clone()
output = training.training_step(sae, optimizer, (x,), cfg["lr"], cfg["max_grad_norm"])
import distributed
print(json.dumps({
    "training": training.__file__,
    "its_distributed": training.distributed.__name__,
    "loss": float(output["loss"]),
    "changed": bool((sae.W_enc != before).any()),
    "distributed": distributed.__file__,
    "dask_distributed_has_Client": hasattr(distributed, "Client"),
}))
"""


@pytest.mark.skipif(os.environ.get("SKIP_INSTALL_TESTS") == "1", reason="SKIP_INSTALL_TESTS=1")
def test_installed_beside_dask_distributed_it_trains_outside_the_checkout(wheel, tmp_path):
    venv = tmp_path / "venv"
    subprocess.run([sys._base_executable, "-m", "venv", str(venv)], check=True)
    python = venv / "bin" / "python"
    site = Path(
        subprocess.run(
            [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
            check=True,
            capture_output=True,
            text=True,
        ).stdout.strip()
    )
    # This environment's packages, after the fresh one's own (a .pth line is appended to sys.path).
    (site / "zz_borrowed.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    pip = [str(python), "-m", "pip", "install", "--quiet", "--disable-pip-version-check"]
    subprocess.run([*pip, "--no-deps", str(wheel)], check=True, capture_output=True)
    installed = subprocess.run([*pip, "distributed"], capture_output=True, text=True)
    if installed.returncode != 0:
        pytest.fail(
            f"pip install distributed failed (is the package index reachable?):\n{installed.stderr[-2000:]}"
        )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    result = subprocess.run(
        [str(python), "-c", ONE_STEP],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    facts = json.loads(result.stdout.strip().splitlines()[-1])
    assert facts["training"].startswith(str(site / "matryoshka_sae"))
    assert facts["its_distributed"] == "matryoshka_sae.distributed"
    assert facts["changed"] and facts["loss"] > 0
    assert facts["distributed"] == str(site / "distributed" / "__init__.py")
    assert facts["dask_distributed_has_Client"]
    refused = subprocess.run(
        [str(venv / "bin" / "sae-train"), "--num-tokens", "-5"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert refused.returncode == 2 and refused.stderr.startswith("sae-train: error: ")
    for command in ("sae-train", "sae-export"):
        assert (
            subprocess.run(
                [str(venv / "bin" / command), "--help"],
                cwd=tmp_path,
                env=env,
                capture_output=True,
                timeout=300,
            ).returncode
            == 0
        )


def test_the_users_names_at_the_root_are_the_package_modules():
    """`import sae` at the root *is* matryoshka_sae.sae (not a copy), for each name on the user's card."""
    code = (
        "import importlib, json\n"
        f"names = {list(USER_MODULES)!r}\n"
        "print(json.dumps({n: importlib.import_module(n) is importlib.import_module('matryoshka_sae.' + n) "
        "for n in names}))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True
    )
    assert json.loads(result.stdout) == {name: True for name in USER_MODULES}


def test_monkeypatching_a_root_name_patches_the_package(monkeypatch):
    import sae
    from matryoshka_sae import sae as package_sae

    monkeypatch.setattr(sae, "create_sae", lambda cfg: "patched")
    assert package_sae.create_sae({}) == "patched"
    assert isinstance(package_sae.BatchTopKSAE.__new__(package_sae.BatchTopKSAE), sae.BatchTopKSAE)
