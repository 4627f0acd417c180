# SPDX-License-Identifier: MIT
"""Only here to compile pcidev's cffi extension; all metadata lives in pyproject.toml."""

from setuptools import setup

setup(cffi_modules=["pcidev/_native_build.py:ffibuilder"])
