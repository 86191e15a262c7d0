"""A Checkpoint image loses its zero pages behind the sleep (hibernate.agent.criu.shrink, issue 17).

The sleep is reported once criu's image is complete; the rewrite then works on a copy of hard links
and takes the image's place in one rename exchange. These tests hold it to that: the image a restore
may read at any moment is whole, either criu's or the smaller one; a cancelled shrink leaves criu's
untouched; an image removed meanwhile does not come back; what a killed shrink leaves is removed.
The last test does it on a real process tree with CRIU. tests/test_faults.py kills the agent inside
a shrink and wakes the engine after its restart.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest

from hibernate.agent import criu
from hibernate.agent.criu import images, shrink, zeropages
from hibernate.agent.criu.zeropages import PE_LAZY, PE_PRESENT, PagemapEntry
from tests.test_zero_pages import (
    ANON,
    PAGE,
    VMA_ANON_PRIVATE,
    ZERO,
    data,
    field,
    page_map,
    tree_in_a_pod,
    write_image,
)

BLOCK = zeropages.BLOCK_PAGES


def complete_image(image: Path, zero_blocks: int = 4, data_blocks: int = 2) -> list[bytes]:
    """A hand-made image that passes criu.check_image and verify_image: a page map of one entry with
    `zero_blocks` blocks of zero bytes after `data_blocks` of data; returns the pages."""
    image.mkdir(parents=True, mode=0o700)
    pages = [data(i % 200) for i in range(data_blocks * BLOCK)] + [ZERO] * (zero_blocks * BLOCK)
    write_image(image, pages, [PagemapEntry(ANON, len(pages), PE_PRESENT | PE_LAZY)])
    vma = field(14, field(1, ANON) + field(2, ANON + len(pages) * PAGE) + field(7, VMA_ANON_PRIVATE))
    (image / "mm-1.img").write_bytes(zeropages.image_file(zeropages.MM_MAGIC, [vma]))  # all of it
    for name in ("inventory.img", "pstree.img", "core-1.img"):
        (image / name).write_bytes(b"criu")
    (image / images.DUMP_LOG).write_text(f"(00.1) {images.DUMP_OK}\n")
    images.seal(image)
    images.ImageMetadata(
        gpu_model=None,
        driver_version=None,
        criu_version="4.2",
        kernel_release=os.uname().release,
        engine_pid=1,
        created="2026-12-06T00:00:00Z",
        image_bytes=images.image_bytes(image),
        files=images.file_sizes(image),
    ).write(image)
    return pages


def contents(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())}


def test_a_shrunk_image_takes_the_place_of_criu_s_whole_and_verified(tmp_path: Path) -> None:
    image = tmp_path / "pod" / "engine"
    pages = complete_image(image)
    before = images.image_bytes(image)
    criu_map = (image / "pagemap-1.img").read_bytes()
    with open(image / "pagemap-1.img", "rb") as old_map:  # a restore that opened criu's image
        done = shrink.shrink(image)
        assert old_map.read() == criu_map, "reads criu's page map to the end"

    assert done.compaction is not None, done.reason
    assert done.compaction.pages_left_out == 4 * BLOCK
    meta = criu.verify_image(image)  # complete, root-only, every size as its metadata says
    assert meta.zero_pages_left_out == 4 * BLOCK
    assert meta.image_bytes == images.image_bytes(image) == done.image_bytes == before - 4 * BLOCK * PAGE
    pages_id, entries = page_map(image)
    assert entries == [PagemapEntry(ANON, 2 * BLOCK, PE_PRESENT | PE_LAZY)]
    assert (image / f"pages-{pages_id}.img").read_bytes() == b"".join(pages[: 2 * BLOCK])
    assert sorted(p.name for p in image.parent.iterdir()) == ["engine"], "no copy, no swapped-out image left"


def test_criu_s_files_are_never_written_while_the_copy_is_rewritten(tmp_path: Path) -> None:
    """The copy shares criu's files by hard links: a file criu wrote, opened before the shrink, still
    reads what criu wrote after it (the rewrite writes new files and renames, it never writes into one)."""
    image = tmp_path / "pod" / "engine"
    complete_image(image)
    written = contents(image)
    opened = {name: open(image / name, "rb") for name in written}  # noqa: SIM115
    try:
        assert shrink.shrink(image).compaction is not None
        assert {name: f.read() for name, f in opened.items()} == written
    finally:
        for f in opened.values():
            f.close()


def test_a_cancelled_shrink_leaves_criu_s_image_as_it_was_and_nothing_beside_it(tmp_path: Path) -> None:
    image = tmp_path / "pod" / "engine"
    complete_image(image)
    written = contents(image)
    stop = threading.Event()
    stop.set()

    done = shrink.shrink(image, stop)

    assert (done.compaction, done.reason) == (None, "cancelled")
    assert contents(image) == written
    assert sorted(p.name for p in image.parent.iterdir()) == ["engine"]


def test_an_image_with_too_few_zero_pages_stays_as_criu_wrote_it(tmp_path: Path) -> None:
    image = tmp_path / "pod" / "engine"
    complete_image(image, zero_blocks=1, data_blocks=16)
    written = contents(image)

    done = shrink.shrink(image)

    assert (done.compaction, done.reason) == (None, "too few zero pages to leave out")
    assert contents(image) == written and sorted(p.name for p in image.parent.iterdir()) == ["engine"]


def test_a_damaged_image_is_not_shrunk_and_the_wake_still_refuses_it(tmp_path: Path) -> None:
    """A file cut short after the dump (a disk error): the copy's metadata would measure the cut file
    and call it whole; the shrink leaves such an image alone, and the wake's size check refuses it."""
    image = tmp_path / "pod" / "engine"
    complete_image(image)
    os.truncate(image / "core-1.img", 1)
    written = contents(image)

    done = shrink.shrink(image)

    assert done.compaction is None and done.reason.startswith("the image is not as criu wrote it"), done
    assert "core-1.img has 1 bytes, 4 when it was written" in done.reason
    assert contents(image) == written and sorted(p.name for p in image.parent.iterdir()) == ["engine"]
    with pytest.raises(criu.ImageRefused, match=r"core-1\.img has 1 bytes"):
        criu.verify_image(image)


def test_a_file_cut_short_during_the_shrink_is_found_and_the_copy_dropped(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The copy shares the files it does not rewrite with criu's image: one cut short while the pages
    are rewritten is cut in both. Its metadata keeps the size criu recorded, so the copy fails its
    check, criu's image stays, and the wake refuses it."""
    image = tmp_path / "pod" / "engine"
    complete_image(image)
    rewrite = zeropages.leave_out_zero_pages

    def rewrite_then_cut(copy: Path, **kwargs: object) -> zeropages.Compaction:
        done = rewrite(copy, **kwargs)  # type: ignore[arg-type]
        os.truncate(image / "core-1.img", 1)
        return done

    monkeypatch.setattr(zeropages, "leave_out_zero_pages", rewrite_then_cut)

    done = shrink.shrink(image)

    assert done.compaction is None and "core-1.img has 1 bytes, 4 when it was written" in done.reason, done
    assert criu.ImageMetadata.load(image).zero_pages_left_out == 0, "criu's image, not the copy"
    assert sorted(p.name for p in image.parent.iterdir()) == ["engine"]
    with pytest.raises(criu.ImageRefused, match=r"core-1\.img has 1 bytes"):
        criu.verify_image(image)


def test_a_shrink_that_would_leave_the_disk_short_for_other_dumps_does_not_start(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The copy writes up to the image's pages while criu's image stays: it starts only where twice
    that is free, so another pod's dump on the same disk does not fail for it."""
    image = tmp_path / "pod" / "engine"
    complete_image(image)
    written = contents(image)
    pages = sum(p.stat().st_size for p in image.glob("pages-*.img"))
    monkeypatch.setattr(shrink, "_free_bytes", lambda path: 2 * pages - 1)

    done = shrink.shrink(image)

    assert done.compaction is None and done.reason.startswith("too little free disk"), done
    assert contents(image) == written and sorted(p.name for p in image.parent.iterdir()) == ["engine"]
    monkeypatch.setattr(shrink, "_free_bytes", lambda path: 2 * pages)
    assert shrink.shrink(image).compaction is not None, "with twice the pages free it runs"


def test_an_image_removed_during_the_shrink_does_not_come_back(tmp_path: Path) -> None:
    """The exchange needs the image in place: a pod deleted meanwhile (its images removed) stays gone."""
    image = tmp_path / "pod" / "engine"
    complete_image(image)
    copy = tmp_path / "pod" / ".engine.partial-x"
    copy.mkdir()
    (copy / "file").write_text("the shrunk copy")
    images.remove_image(image)

    with pytest.raises(FileNotFoundError):
        shrink._exchange(copy, image)
    assert not image.exists() and (copy / "file").exists(), "nothing renamed"
    assert shrink.shrink(image).compaction is None
    assert not image.exists() and sorted(p.name for p in image.parent.iterdir()) == [copy.name]


def test_a_copy_left_by_a_killed_shrink_is_removed_and_the_image_kept(tmp_path: Path) -> None:
    """An agent killed mid-shrink leaves a `.partial-` copy beside a whole image: the restarted
    agent's settle (levels.probe) removes it, as it removes what a killed dump left."""
    image = tmp_path / "pod" / "engine"
    complete_image(image)
    written = contents(image)
    left = tmp_path / "pod" / ".engine.partial-killed"
    left.mkdir(mode=0o700)
    for name in written:
        os.link(image / name, left / name)

    done = criu.settle(image, engine_running=False)

    assert done == [f"removed the unfinished image {left.name}"]
    assert contents(image) == written and sorted(p.name for p in image.parent.iterdir()) == ["engine"]


def test_the_shrinker_cancels_a_shrink_and_records_how_each_ended(tmp_path: Path) -> None:
    shrinker = shrink.Shrinker()
    image = tmp_path / "pod" / "engine"
    complete_image(image)
    shrinker.start(image)
    ended = shrinker.wait(image, timeout=30)
    assert ended is not None and ended.compaction is not None, ended
    assert shrinker.cancel(image) is False, "nothing runs any more"

    other = tmp_path / "other" / "engine"
    complete_image(other, zero_blocks=64)
    shrinker.start(other)
    shrinker.cancel(other)
    ended = shrinker.wait(other)
    assert ended is not None and (ended.compaction is not None or ended.reason == "cancelled"), ended
    criu.verify_image(other)  # whichever came first, the image is whole
    assert sorted(p.name for p in other.parent.iterdir()) == ["engine"]


@pytest.mark.criu
def test_a_tree_dumped_then_shrunk_behind_the_sleep_restores_every_page(tmp_path: Path) -> None:
    with tree_in_a_pod(tmp_path, "shrink-0") as (pod, image, before):
        result = criu.dump(
            image,
            pod.engine_ns_pid(),
            criu.Pod(pod.init_pid),
            checkpoint_root=image.parents[2],
            zero_pages_now=False,
        )
        assert result.metadata.zero_pages_left_out == 0, "criu's image, as it wrote it"
        stop = threading.Event()
        stop.set()
        assert shrink.shrink(image, stop).reason == "cancelled"
        assert criu.verify_image(image).files == result.metadata.files

        done = shrink.shrink(image)

        assert done.compaction is not None, done.reason
        assert done.compaction.pages_left_out >= (247 + 246) * BLOCK  # as in test_zero_pages
        meta = criu.verify_image(image, root=image.parents[2])
        assert meta.zero_pages_left_out == done.compaction.pages_left_out
        assert meta.image_bytes < result.metadata.image_bytes
        criu.restore(image, criu.Pod(pod.init_pid))
        assert pod.get_json("/check") == before
