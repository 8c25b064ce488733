"""Counting what a reader takes from safetensors files: a stand-in for safe_open that records, per file
name, the bytes of every tensor and slice read through it. A loader that read a whole file some other
way (load_file, a full get_tensor) shows up as too many bytes, or none."""

from __future__ import annotations

import contextlib
import pathlib
from collections import Counter


class _CountedSlice:
    def __init__(self, view, counts: Counter, file: str):
        self._view, self._counts, self._file = view, counts, file

    def __getitem__(self, index):
        rows = self._view[index]
        self._counts[self._file] += rows.numel() * rows.element_size()
        return rows

    def __getattr__(self, name: str):
        return getattr(self._view, name)


class _CountedHandle:
    def __init__(self, handle, counts: Counter, file: str):
        self._handle, self._counts, self._file = handle, counts, file

    def __enter__(self):
        self._handle.__enter__()
        return self

    def __exit__(self, *exception):
        return self._handle.__exit__(*exception)

    def get_slice(self, name: str) -> _CountedSlice:
        return _CountedSlice(self._handle.get_slice(name), self._counts, self._file)

    def get_tensor(self, name: str):
        tensor = self._handle.get_tensor(name)
        self._counts[self._file] += tensor.numel() * tensor.element_size()
        return tensor

    def __getattr__(self, name: str):
        return getattr(self._handle, name)


@contextlib.contextmanager
def counting_reads(module):
    """Inside the block, `module`'s safe_open counts what is read through it: yields a Counter of bytes
    per file name."""
    counts: Counter = Counter()
    original = module.safe_open

    def counted(path, *args, **kwargs):
        return _CountedHandle(original(path, *args, **kwargs), counts, pathlib.Path(path).name)

    module.safe_open = counted
    try:
        yield counts
    finally:
        module.safe_open = original
