"""A non-editable install finds its configs from any working directory."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tqstar.methods import METHOD_NAMES

pytestmark = pytest.mark.slow  # a pip install of the package

ROOT = Path(__file__).resolve().parents[1]


def test_configs_ship_inside_the_wheel(tmp_path):
    target = tmp_path / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "--target", str(target), str(ROOT)],
        check=True,
        capture_output=True,
        cwd=tmp_path,
    )
    code = (
        "import tqstar.config as c; cfg = c.validate(c.compose(['decoder=cd', 'experiment=smollm2_offline'])); "
        "print(c.conf_dir()); print(cfg.decoder.method, sorted(c.group_options('decoder')))"
    )
    env = {**os.environ, "PYTHONPATH": str(target)}
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True, cwd=elsewhere, env=env)
    conf, line = out.stdout.strip().splitlines()
    assert Path(conf) == target / "tqstar" / "conf"
    assert line == f"cd {sorted(METHOD_NAMES)}"  # every method's config shipped
    assert (target / "tqstar" / "data" / "hh_prompts.jsonl").is_file()
