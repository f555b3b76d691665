"""The environment is the lock's: requirements.lock (`make lock`) pins every package within
pyproject.toml's ranges, and `make setup` installed those versions here."""

from __future__ import annotations

import tomllib
from importlib import metadata

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from tests.helpers import REPO

PROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
# Installed over stock Pillow, which the lock pins for torchvision and matplotlib.
REPLACED = {"pillow": "pillow-simd"}


def locked() -> dict[str, str]:
    """name -> version of the lock's pins that apply to this Python and platform."""
    pins = {}
    for line in (REPO / "requirements.lock").read_text().splitlines():
        if not line or line[0] in "# ":
            continue
        requirement = Requirement(line)
        if requirement.marker is None or requirement.marker.evaluate():
            (pin,) = requirement.specifier  # one `==` a package
            assert pin.operator == "==", line
            pins[canonicalize_name(requirement.name)] = pin.version
    return pins


def wanted() -> list[Requirement]:
    """The project's requirements and its dev extra's (the extras it names of itself
    included), those that apply here."""
    extras = PROJECT["optional-dependencies"]
    requirements = [Requirement(text) for text in PROJECT["dependencies"] + extras["dev"]]
    for requirement in list(requirements):
        if canonicalize_name(requirement.name) == canonicalize_name(PROJECT["name"]):
            requirements.remove(requirement)
            requirements += [Requirement(t) for extra in requirement.extras for t in extras[extra]]
    return [r for r in requirements if r.marker is None or r.marker.evaluate()]


def test_the_lock_pins_every_requirement_within_its_range():
    pins = locked()
    for requirement in wanted():
        name = canonicalize_name(requirement.name)
        assert name in pins, f"requirements.lock has no {name}: run `make lock`"
        assert requirement.specifier.contains(pins[name], prereleases=True), (
            f"requirements.lock pins {name} {pins[name]}, outside pyproject.toml's "
            f"{requirement}: run `make lock`"
        )


def installed(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def test_the_environment_has_the_locked_versions():
    differ = {}
    for name, version in locked().items():
        if name in REPLACED and installed(REPLACED[name]):
            continue  # another distribution, of its own version
        if installed(name) != version:
            differ[name] = (version, installed(name))
    assert not differ, f"name: (locked, installed): {differ}; run `make setup`"
