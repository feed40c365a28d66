"""Print the image's requirements from pyproject.toml, one a line: the project's runtime dependencies,
the deepspeed extra and transformers (users load exports with it), without torch, which the base image
or the wheel in docker/wheels/ provides (pyproject pins the CPU build CI uses)."""

import re
import sys

try:
    import tomllib
except ModuleNotFoundError:  # python 3.10 (Ubuntu 22.04): the copy pip vendors
    from pip._vendor import tomli as tomllib


def name(requirement: str) -> str:
    return re.split(r"[\s\[<>=!~;@]", requirement, maxsplit=1)[0].lower()


with open(sys.argv[1], "rb") as f:
    project = tomllib.load(f)["project"]
extras = project["optional-dependencies"]
wanted = (
    project["dependencies"] + extras["deepspeed"] + [r for r in extras["dev"] if name(r) == "transformers"]
)
print("\n".join(r for r in wanted if name(r) != "torch"))
