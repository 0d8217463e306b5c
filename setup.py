"""Package layout that pyproject.toml cannot state (every other setting is there): the
repository's ``conf/`` ships inside the wheel as ``coalora/conf`` so the ``coalora`` commands
compose their configs from any directory, while ``conf/`` stays at the repository root for the
root scripts and the tests. Each config group is a data-only package (``coalora.conf.model`` ...);
``conf/local/`` holds machine-specific overrides and stays out of the wheel."""

from setuptools import find_namespace_packages, find_packages, setup

CONF = ["coalora.conf"] + [
    f"coalora.conf.{group}" for group in find_namespace_packages(where="conf", exclude=["local*"])
]

setup(
    packages=[*find_packages(include=["coalora", "coalora.*"]), *CONF],
    package_dir={"coalora.conf": "conf"},
    package_data={"coalora": ["py.typed"], **{package: ["*.yaml"] for package in CONF}},
)
