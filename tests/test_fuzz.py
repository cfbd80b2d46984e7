"""Mutated pipelines (the shipped ones and the XPIWIT fixture) never crash the parser or the
validator with anything but our own error type."""

import glob
import os
import random

import pytest

from c3dseg.errors import C3DError
from c3dseg.runner.cli import shipped_pipelines_dir
from c3dseg.runner.pipeline import Pipeline
from c3dseg.runner.plan import build_plan

from conftest import FIXTURES

SOURCES = sorted(glob.glob(os.path.join(shipped_pipelines_dir(), "*.xml"))) + \
    sorted(glob.glob(os.path.join(FIXTURES, "*.xml")))

TOKENS = [b"<", b">", b"/", b'"', b"&", b"&amp;", b"item_0001", b"cmd", b"-1", b"0", b"99999999999999999999",
          b"nan", b"inf", b"\x00", b"\xff\xfe", b"<item>", b"</item>", b"<!--", b"]]>", b"<!DOCTYPE x [<!ENTITY a "
          b"'aaaa'>]>", b"&a;", b"number_of_output", b"type=\"9\"", b"\n", b" ", b"item_id_ref=\"item_0002\""]


def mutate(data: bytes, rng: random.Random) -> bytes:
    data = bytearray(data)
    for _ in range(rng.randint(1, 4)):
        op = rng.random()
        pos = rng.randrange(len(data) + 1)
        if op < 0.3 and data:
            del data[pos:pos + rng.randint(1, 40)]
        elif op < 0.6:
            data[pos:pos] = rng.choice(TOKENS)
        elif op < 0.8 and data:
            end = min(len(data), pos + rng.randint(1, 200))
            chunk = data[pos:end]
            at = rng.randrange(len(data) + 1)
            data[at:at] = chunk
        elif data:
            data[min(pos, len(data) - 1)] = rng.randrange(256)
    return bytes(data)


@pytest.mark.skipif(not SOURCES, reason="no pipelines to mutate")
def test_mutated_pipelines_raise_only_our_errors():
    rng = random.Random(1234)
    crashes = []
    for k in range(600):
        src = SOURCES[k % len(SOURCES)]
        data = mutate(open(src, "rb").read(), rng)
        try:
            build_plan(Pipeline.from_bytes(data, os.path.basename(src)))
        except C3DError as e:
            assert str(e) and "\n" not in str(e).strip()
        except Exception as e:  # pragma: no cover - the failure we look for
            crashes.append((src, type(e).__name__, str(e)[:200], data[:0]))
    assert not crashes, crashes[:3]
