"""Two packages in one distribution: the sparse core `dsd_kernels` and the frontend `dsd`.

The C++ CPU kernels (csrc/) are compiled just-in-time on first use (dsd_kernels/backends/cpp.py).
DSD_BUILD_EXT=1 compiles them ahead of time instead, into dsd_kernels/_cpp_<isa>, with the
flags of the just-in-time build; torch must then be importable, so build without isolation:

    DSD_BUILD_EXT=1 pip install --no-build-isolation .       # or -e . for a checkout
"""
import os
import sys

from setuptools import find_packages, setup


def cpp_extension() -> dict:
    if os.environ.get("DSD_BUILD_EXT") != "1":
        return {}
    from torch.utils.cpp_extension import BuildExtension, CppExtension

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from dsd_kernels.backends import cpp

    isa = cpp.vector_isa()
    extension = CppExtension(f"dsd_kernels._cpp_{isa}", [f"csrc/{name}" for name in cpp.SOURCES],
                             extra_compile_args=cpp.compile_flags(isa),
                             extra_link_args=list(cpp.LINK_FLAGS))
    return {"ext_modules": [extension], "cmdclass": {"build_ext": BuildExtension}}


setup(
    # csrc/ ships inside the package as dsd_kernels/csrc, so an installed wheel can build the
    # C++ kernels just-in-time as a checkout does.
    packages=find_packages(where="src") + find_packages(include=["dsd_kernels", "dsd_kernels.*"])
    + ["dsd_kernels.csrc"],
    package_dir={"dsd": "src/dsd", "dsd_kernels": "dsd_kernels", "dsd_kernels.csrc": "csrc"},
    package_data={"dsd_kernels.csrc": ["*.cpp", "*.h"]},
    **cpp_extension(),
)
