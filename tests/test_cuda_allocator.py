"""The worker's CUDA allocator setting (medray.cuda_allocator): expandable segments unless the user chose."""

from __future__ import annotations

from medray.cuda_allocator import EXPANDABLE_SEGMENTS, setting_to_apply


def test_expandable_segments_unless_an_allocator_variable_is_set():
    assert setting_to_apply({}) == EXPANDABLE_SEGMENTS == "expandable_segments:True"
    assert setting_to_apply({"PYTORCH_ALLOC_CONF": ""}) == EXPANDABLE_SEGMENTS  # empty is unset
    assert setting_to_apply({"PYTORCH_ALLOC_CONF": "max_split_size_mb:128"}) is None
    assert setting_to_apply({"PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:False"}) is None
