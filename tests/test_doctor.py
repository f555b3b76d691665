"""`alexnet doctor`'s codec listing, and the warnings of `make setup` (scripts/setup.sh)
where the headers of those codecs are missing."""

from __future__ import annotations

import os
import subprocess

import pytest
from PIL import features
from typer.testing import CliRunner

from alexnet.doctor import pil_codecs
from alexnet.pilcodecs import CODECS, missing_codec_hint
from flows.cli import app
from tests.helpers import REPO

# The five that setup.sh checks the headers of; the others doctor lists only.
PHOTO_CODECS = ("jpg", "zlib", "libtiff", "webp", "littlecms2")


def test_every_listed_name_is_one_pil_knows():
    # features.check() of a misspelt name warns and answers False: the listing would say
    # "no" for a codec the PIL has.
    known = {**features.codecs, **features.modules, **features.features}
    assert set(CODECS) <= set(known), set(CODECS) - set(known)
    assert {"jpg", "zlib", "libtiff", "webp", "jpg_2000", "avif"} <= set(CODECS)
    assert {"littlecms2", "freetype2", "libjpeg_turbo"} <= set(CODECS)


@pytest.mark.parametrize("name", sorted(CODECS))
def test_codec_listing_agrees_with_pil_features(name):
    kind, package = CODECS[name]
    value = pil_codecs()[f"{kind} {name}"]
    if features.check(name):
        version = features.version(name)
        assert value == (f"yes ({version})" if version else "yes")
    else:
        assert value == f"no — install {package} and re-run make setup"


def test_missing_codec_hint_names_the_codec_its_package_and_doctor():
    hint = missing_codec_hint("libtiff")
    assert hint.startswith("libtiff (not in this PIL")
    assert "libtiff-dev" in hint and "`alexnet doctor`" in hint
    assert missing_codec_hint("nothing").startswith("nothing (not in this PIL")


def test_doctor_prints_a_line_per_codec():
    result = CliRunner().invoke(app, ["doctor"])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    for key, value in pil_codecs().items():
        assert any(line.startswith(key + " ") and line.endswith(value) for line in lines), key


def setup_stderr(tmp_path, cc_finds_headers: bool) -> str:
    """scripts/setup.sh's stderr with a `cc` that finds every header or none. It stops
    right after the header checks: its venv is new and PYTHON=false cannot create it."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "cc").write_text(f"#!/bin/sh\nexit {0 if cc_finds_headers else 1}\n")
    (bin_dir / "cc").chmod(0o755)
    env = {
        **os.environ,
        "PATH": f"{bin_dir}:{os.environ['PATH']}",
        "VENV": str(tmp_path / "venv"),
        "PYTHON": "false",
    }
    result = subprocess.run(
        ["bash", "scripts/setup.sh"], cwd=REPO, env=env, capture_output=True, text=True
    )
    assert result.returncode != 0 and not (tmp_path / "venv").exists()
    return result.stderr


def test_setup_makes_again_a_venv_a_failed_venv_left_without_pip(tmp_path):
    # `python3 -m venv` without python3-venv leaves bin/python and no pip: reused, every
    # later setup failed on "No module named pip" without saying why
    (tmp_path / "venv" / "bin").mkdir(parents=True)
    left = tmp_path / "venv" / "bin" / "python"
    left.write_text("#!/bin/sh\necho 'No module named pip' >&2\nexit 1\n")
    python = tmp_path / "python3"  # venv's failure, and what it was asked
    python.write_text(
        f"#!/bin/sh\necho \"$@\" > {tmp_path}/called\necho 'no ensurepip' >&2\nexit 1\n"
    )
    for script in (left, python):
        script.chmod(0o755)
    env = {**os.environ, "VENV": str(tmp_path / "venv"), "PYTHON": str(python)}
    result = subprocess.run(
        ["bash", "scripts/setup.sh"], cwd=REPO, env=env, capture_output=True, text=True
    )
    assert result.returncode != 0 and result.stderr.strip().endswith("no ensurepip")
    called = (tmp_path / "called").read_text().split()
    assert called == ["-m", "venv", "--clear", str(tmp_path / "venv")]


def test_setup_warns_once_per_missing_codec_header_with_its_package(tmp_path):
    warnings = [w for w in setup_stderr(tmp_path, False).splitlines() if "WARNING" in w]
    assert len(warnings) == len(PHOTO_CODECS), warnings
    for name, warning in zip(PHOTO_CODECS, warnings, strict=True):
        # The package doctor names for the codec, so the two never disagree.
        assert f"apt-get install {CODECS[name][1]}, then re-run make setup" in warning
    assert "lcms2.h" in warnings[-1] and "LittleCMS" in warnings[-1]


def test_setup_is_quiet_where_every_header_is_there(tmp_path):
    assert "WARNING" not in setup_stderr(tmp_path, True)
