"""setuptools shim: cffi compiles native/ into trionet._native at build time."""

from setuptools import setup

setup(cffi_modules=["native/build_native.py:ffibuilder"])
