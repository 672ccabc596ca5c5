"""Build of beitfast (the extension beitfast._C is added by the build of csrc/)."""

from setuptools import setup

setup(
    packages=["beitfast", "beitfast.ops", "beitfast.kernels"],
    package_dir={"beitfast": "beitfast", "beitfast.kernels": "kernels"},
)
