"""The upstream_tests tool's inputs: which release's tests, from where, and which
vllm_eplb the child pytest imports. (Running the tests themselves is the tool's own job:
`python -m vllm_eplb.tools.upstream_tests`, in scripts/test.sh.)"""

from __future__ import annotations

import os

import pytest

from vllm_eplb.compat.versions import PATCHED
from vllm_eplb.tools import upstream, upstream_tests


def test_child_imports_this_trees_vllm_eplb_first():
    elsewhere = os.path.join(os.sep, "opt", "vllm-0.26.0")
    inherited = os.pathsep.join([elsewhere, str(upstream.ROOT), ""])
    assert upstream_tests.child_pythonpath(inherited).split(os.pathsep) == [str(upstream.ROOT), elsewhere]
    assert upstream_tests.child_pythonpath("") == str(upstream.ROOT)


def test_src_without_tests_is_refused_by_name(tmp_path):
    (tmp_path / "pyproject.toml").write_text("")
    with pytest.raises(SystemExit, match=rf"--src {tmp_path}: no tests there"):
        upstream_tests.main(["--release", "0.32.0", "--src", str(tmp_path)])


def test_release_without_test_patches_is_refused(capsys):
    assert upstream_tests.main(["--release", "0.1.0"]) == 1
    err = capsys.readouterr().err
    assert "vLLM 0.1.0 has no test patches" in err
    assert all(v in err for v in PATCHED)
