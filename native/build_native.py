"""cffi build script: every native/*.h is the cdef, every native/*.c a source.

Run by setuptools (``cffi_modules`` in setup.py) or by hand for an in-place
build: ``python native/build_native.py`` writes trionet/_native*.so.
"""

from __future__ import annotations

import pathlib
import re

from cffi import FFI

HERE = pathlib.Path(__file__).resolve().parent
HEADERS = sorted(HERE.glob("*.h"))
SOURCES = sorted(HERE.glob("*.c"))
_INT_DEFINE = re.compile(r"#define\s+\w+\s+(0x[0-9a-fA-F]+|\d+)[uUlL]*\s*$")


def _cdef_text(path: pathlib.Path) -> str:
    """Keep only what cffi's cdef understands: integer #defines stay, other
    preprocessor lines go, and so does
    anything between ``/* cdef-skip */`` and ``/* cdef-end */``."""
    text = path.read_text()
    text = re.sub(r"/\* cdef-skip \*/.*?/\* cdef-end \*/", "", text, flags=re.S)
    keep = []
    for line in text.splitlines():
        stripped = line.lstrip()
        if stripped.startswith("#") and not _INT_DEFINE.match(stripped):
            continue
        keep.append(line)
    return "\n".join(keep)


ffibuilder = FFI()
# system types the headers use, declared for cffi only (the C side has <sys/uio.h>)
ffibuilder.cdef("struct iovec { void *iov_base; size_t iov_len; };")
for header in HEADERS:
    ffibuilder.cdef(_cdef_text(header))
ffibuilder.set_source(
    "trionet._native",
    "\n".join(f'#include "{h.name}"' for h in HEADERS),
    sources=[str(s.relative_to(HERE.parent)) for s in SOURCES],
    include_dirs=[str(HERE.relative_to(HERE.parent))],
    extra_compile_args=["-O2", "-std=gnu11", "-Wall", "-Wextra", "-Wno-unused-parameter"],
)

if __name__ == "__main__":
    import os

    os.chdir(HERE.parent)
    ffibuilder.compile(tmpdir=".", verbose=False)
