"""Helpers of benchmarks/lookahead_cache.py: the part selection and the cold-start drop."""
import os

import pytest


@pytest.fixture(scope="module")
def bench(load_benchmark):
    return load_benchmark("lookahead_cache")


def test_only_selects_parts_and_refuses_unknown_ones(bench):
    assert bench._parts(None) == list(bench.PARTS)
    assert bench._parts("scaling") == ["scaling"]
    assert bench._parts("cold, zipf") == ["cold", "zipf"]
    with pytest.raises(SystemExit, match="--only takes"):
        bench._parts("scaling,gpu")


@pytest.mark.skipif(not hasattr(os, "posix_fadvise"), reason="no posix_fadvise here")
def test_dropping_cached_pages_keeps_the_files(bench, tmp_path):
    (tmp_path / "a").write_bytes(b"x" * 10_000)
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b").write_bytes(b"y" * 5_000)
    assert bench.drop_cached_pages(str(tmp_path)) == 15_000
    assert (tmp_path / "a").read_bytes() == b"x" * 10_000 and (tmp_path / "sub" / "b").read_bytes() == b"y" * 5_000


def test_a_cold_store_opens_with_its_rows(bench, tmp_path):
    import torch

    image = str(tmp_path / "image")
    bench.build_cold_store(image, 500)
    store = bench.open_cold(image, str(tmp_path / "copy"), 500, drop_page_cache=True)
    try:
        got = store.lookup(torch.tensor([1, 250, 500, 501]))
        assert got.found.tolist() == [True, True, True, False]
    finally:
        store.close()


def test_partial_record_marks_itself_incomplete(bench, tmp_path):
    """A run cut by a time limit leaves the parts it finished, marked incomplete."""
    import json

    path = str(tmp_path / "r.json")
    bench.write_partial(path, [{"trace": "zipf", "variant": "lookahead"}], {"misses_at_use": 0})
    with open(path) as f:
        got = json.load(f)
    assert got["summary"] == {"misses_at_use": 0, "complete": False}
    assert got["results"] == [{"trace": "zipf", "variant": "lookahead"}] and "machine" in got
    bench.write_partial(None, [], {})  # no --json: nothing written, no error
