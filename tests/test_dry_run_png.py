"""`dry_run --png`: per-rank load before and after a plan, as a picture."""

import struct
import subprocess
import sys

import numpy as np
import pytest

from vllm_eplb.core import records
from vllm_eplb.core.placement import Topology, default_placement


@pytest.fixture
def skewed_record(tmp_path):
    """vLLM's start-up layout under a skewed load: a few hot experts per layer."""
    rng = np.random.default_rng(3)
    topo = Topology(8, 64, 72)
    load = np.stack([rng.zipf(1.5, 64)[rng.permutation(64)] for _ in range(16)]).astype(float)
    path = str(tmp_path / "record.json")
    records.save(records.PlacementRecord(default_placement(topo, 16), load, 8, 64, "deepseek", 1), path)
    return path


def dry_run(*args):
    return subprocess.run([sys.executable, "-m", "vllm_eplb.tools.dry_run", *args], capture_output=True, text=True, timeout=300)


def test_png_shows_hot_ranks_before_and_not_after(skewed_record, tmp_path):
    image = pytest.importorskip("matplotlib.image", reason="matplotlib (the plot and test extras)")
    out = tmp_path / "balance.png"
    r = dry_run(skewed_record, "--policy", "min-move", "--png", str(out))
    assert r.returncode == 0, r.stderr
    assert f"wrote {out} (1000 x 700 px)" in r.stdout
    data = out.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
    assert struct.unpack(">II", data[16:24]) == (1000, 700)
    px = image.imread(str(out))
    assert px.shape[:2] == (700, 1000)
    # The heatmaps are on the top half, before on the left, after on the right. Deep red
    # marks a rank carrying several times its share: there before the plan, not after.
    top = px[60:340, :, :3]
    red = (top[..., 0] > 0.6) & (top[..., 1] < 0.35) & (top[..., 2] < 0.35)
    before, after = red[:, 100:460].sum(), red[:, 490:830].sum()
    assert before > 500 and after < before / 10, (before, after)
    assert len(np.unique(px.reshape(-1, px.shape[-1]), axis=0)) > 100  # a drawn figure, not a blank canvas


def test_png_without_matplotlib_is_one_line(skewed_record, tmp_path):
    code = (
        "import sys; sys.modules['matplotlib'] = None\n"  # as if not installed
        "from vllm_eplb.tools import dry_run\n"
        f"sys.exit(dry_run.main([{skewed_record!r}, '--png', {str(tmp_path / 'x.png')!r}]))\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 2
    assert r.stderr.strip() == "error: --png needs matplotlib: pip install 'vllm-eplb[plot]'"
    assert not (tmp_path / "x.png").exists()


def test_png_to_an_unwritable_path_is_one_line(skewed_record, tmp_path):
    pytest.importorskip("matplotlib")
    r = dry_run(skewed_record, "--png", str(tmp_path / "missing-dir" / "x.png"))
    assert r.returncode == 2
    assert r.stderr.strip().startswith("error: ") and len(r.stderr.strip().splitlines()) == 1, r.stderr
