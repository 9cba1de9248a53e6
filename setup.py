"""Two packages in one distribution: the sparse core `dsd_kernels` and the frontend `dsd`."""
from setuptools import find_packages, setup

setup(
    packages=find_packages(where="src") + find_packages(include=["dsd_kernels", "dsd_kernels.*"]),
    package_dir={"dsd": "src/dsd", "dsd_kernels": "dsd_kernels"},
)
