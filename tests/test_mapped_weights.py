"""Weights memory-mapped instead of loaded (toolkit/mapped_weights.py): the page releaser gives
pages back, in this process and from its helper process, and a reference computed on mapped
weights is the reference computed on loaded ones."""

from __future__ import annotations

import mmap
import os
import sys
import time

import numpy as np
import pytest

from conftest import REPO
from toolkit.mapped_weights import PageReleaser


def resident_mb(path) -> float:
    """This process's resident pages of `path` (Rss over its mappings in /proc/self/smaps)."""
    total, inside = 0, False
    for line in open("/proc/self/smaps"):
        fields = line.split()
        if "-" in fields[0] and len(fields) >= 5 and ":" in fields[3]:
            inside = len(fields) == 6 and fields[5] == str(path)
        elif inside and fields[0] == "Rss:":
            total += int(fields[1])
    return total / 1024


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="madvise / process_madvise "
                    "are Linux calls; elsewhere the releaser does nothing by design")
def test_page_releaser_gives_back_mapped_pages(tmp_path):
    path = tmp_path / "weights.bin"
    path.write_bytes(os.urandom(64 << 20))
    with open(path, "rb") as f:
        mapped = mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ)
        releaser = PageReleaser({str(path)})
        sum(mapped[i] for i in range(0, len(mapped), 4096))  # every page resident
        assert resident_mb(path) > 60
        releaser.release()
        assert resident_mb(path) < 2
        sum(mapped[i] for i in range(0, len(mapped), 4096))
        assert resident_mb(path) > 60
        if os.geteuid() != 0:
            pytest.skip("the helper's process_madvise(MADV_PAGEOUT) needs CAP_SYS_NICE; this "
                        "test runs unprivileged")
        with releaser.while_running(every_s=0.05):
            time.sleep(1.0)
            during = resident_mb(path)  # paged out by the helper process, not by this one
        assert during < 2, f"{during:.0f} MB still resident while the helper ran"
        assert mapped[:16] == path.read_bytes()[:16]  # nothing lost: the file's bytes again
        mapped.close()


def test_reference_on_mapped_weights_is_the_loaded_ones():
    """tiny-phi3 is an fp16 checkpoint: an fp16 reference maps it, and gives the same ids,
    top-K and greedy tokens as from_pretrained's copy."""
    from toolkit.evalset import load_evalset
    from toolkit.reference import compute_reference

    evalset = load_evalset(REPO / "evalsets" / "tiny-phi3.jsonl", 6)
    source = REPO / "models" / "tiny-phi3"
    mapped, loaded = (compute_reference(source, evalset, 48, 6, dtype="float16", map_weights=m)
                      for m in (True, False))
    assert (mapped.meta["weights"], loaded.meta["weights"]) == ("memory-mapped", "loaded")
    assert mapped.texts and mapped.prompts
    for a, b in zip(mapped.texts + mapped.prompts, loaded.texts + loaded.prompts):
        for field in ("ids", "topk_ids", "topk_logp", "next_logp", "prompt_ids", "greedy_ids"):
            if hasattr(a, field):
                np.testing.assert_array_equal(getattr(a, field), getattr(b, field), field)
