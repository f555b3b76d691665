"""The isolated decoder: the child's answers equal `prepare_image` in this process, and
a file that crashes or hangs the decoder costs that file alone."""

from __future__ import annotations

import time

import pytest

from alexnet.decoder import Isolated, isolated
from alexnet.imageops import BadImage, prepare_image
from alexnet.params import PrepareParams
from tests.decoder_plugin import ABORT, CRASH, HANG
from tests.helpers import encode, jpeg, photo

OPTIONS = PrepareParams(plugins=("tests.decoder_plugin",)).image_options()
FILES = {
    "plain.jpg": jpeg(320, 240, seed=1),
    "grey.jpg": encode(photo(300, 280, seed=2).convert("L")),
    "png.jpg": encode(photo(260, 300, seed=3), "PNG"),
    "empty.jpg": b"",
    "text.jpg": b"hello, not an image",
    "truncated.jpg": jpeg(400, 300, seed=4)[:900],
}


def outcome(call, data: bytes, extension: str):
    try:
        prepared = call(data, extension)
    except BadImage as error:
        return "skipped", str(error)
    return prepared.jpeg, prepared.converted


@pytest.fixture
def decoder():
    decoder = Isolated(timeout=3.0)
    yield decoder
    decoder.close()


def test_the_child_gives_what_prepare_image_gives_here(decoder):
    for name, data in FILES.items():
        extension = "." + name.rsplit(".", 1)[1]
        here = outcome(lambda d, e: prepare_image(d, e, **OPTIONS), data, extension)
        there = outcome(lambda d, e: decoder.prepare(d, e, OPTIONS), data, extension)
        assert there == here, name
    assert outcome(lambda d, e: decoder.prepare(d, e, OPTIONS), b"", ".jpg")[1] == "empty file"


def test_the_child_applies_the_options_it_is_sent(decoder):
    small = {**OPTIONS, "size": 64, "quality": 50}
    assert decoder.prepare(FILES["plain.jpg"], ".jpg", small).jpeg == (
        prepare_image(FILES["plain.jpg"], ".jpg", **small).jpeg
    )
    assert decoder.prepare(FILES["plain.jpg"], ".jpg", small).jpeg != (
        decoder.prepare(FILES["plain.jpg"], ".jpg", OPTIONS).jpeg
    )


@pytest.mark.parametrize(
    ("magic", "reason"),
    [
        (CRASH, "decoder crashed (SIGSEGV)"),
        (ABORT, "decoder crashed (SIGABRT)"),
        (HANG, "timed out after 3 s"),
    ],
)
def test_a_crash_or_a_hang_costs_only_that_file(decoder, magic, reason):
    good = FILES["plain.jpg"]
    expected = prepare_image(good, ".jpg", **OPTIONS).jpeg
    assert decoder.prepare(good, ".jpg", OPTIONS).jpeg == expected
    first = decoder._child.pid
    start = time.monotonic()
    with pytest.raises(BadImage) as error:
        decoder.prepare(magic + b"rest of the file", ".jpg", OPTIONS)
    assert str(error.value) == reason
    assert time.monotonic() - start < 3.0 + 2.0  # killed at the limit, not later
    # The next file gets a fresh child and the same bytes as ever.
    assert decoder.prepare(good, ".jpg", OPTIONS).jpeg == expected
    assert decoder._child.pid != first


def test_a_child_killed_between_files_is_replaced_without_blaming_the_next(decoder):
    good = FILES["plain.jpg"]
    decoder.prepare(good, ".jpg", OPTIONS)
    decoder._child.kill()
    decoder._child.wait()
    assert (
        decoder.prepare(good, ".jpg", OPTIONS).jpeg == prepare_image(good, ".jpg", **OPTIONS).jpeg
    )


def test_a_plugin_that_cannot_be_imported_skips_files_with_the_reason(decoder):
    with pytest.raises(BadImage, match="cannot decode: ModuleNotFoundError: No module named"):
        decoder.prepare(FILES["plain.jpg"], ".jpg", {**OPTIONS, "plugins": ["no_such_plugin"]})


def test_each_thread_has_its_own_decoder():
    import threading

    mine = isolated(5.0)
    assert isolated(5.0) is mine
    others = []
    thread = threading.Thread(target=lambda: others.append(isolated(5.0)))
    thread.start()
    thread.join()
    assert others[0] is not mine


def test_a_stream_of_files_with_crashes_and_hangs_in_it_gives_every_answer_in_order(decoder):
    good = list(FILES.items())
    batch = [
        *[(data, ".jpg") for _, data in good[:3]],
        (CRASH, ".jpg"),
        *[(data, ".jpg") for _, data in good[3:]],
        (HANG, ".jpg"),
        (ABORT, ".jpg"),
        *[(data, ".jpg") for _, data in good],
    ]
    results = decoder.prepare_all(batch, OPTIONS)
    assert len(results) == len(batch)
    crashed = {
        CRASH: "decoder crashed (SIGSEGV)",
        ABORT: "decoder crashed (SIGABRT)",
        HANG: "timed out after 3 s",
    }
    for index, (result, (data, extension)) in enumerate(zip(results, batch, strict=True)):
        got = ("skipped", str(result)) if isinstance(result, BadImage) else result
        if data in crashed:  # (never decoded in this process: it would crash the tests)
            assert got == ("skipped", crashed[data]), index
        else:
            expected = outcome(lambda d, e: prepare_image(d, e, **OPTIONS), data, extension)
            assert (got if isinstance(got, tuple) else (got.jpeg, got.converted)) == expected
