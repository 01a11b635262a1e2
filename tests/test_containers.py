"""Limits by content, not by name: every container of a JPEG stream (JFIF, EXIF, MPO as phones
write it, progressive, a JPEG-compressed TIFF) gets the same scan limit, downscaling and pixel
budget, on the server (contract/preprocessing.py) and on the page (web/preprocessing.js, run
here under Node: the rules read bytes only, no DOM)."""
from __future__ import annotations

import base64
import io
import json
import shutil
import subprocess
import time

import numpy as np
import pytest
from PIL import Image

from contract.preprocessing import (MAX_JPEG_SCANS, InputSpec, InvalidInput, decode, decode_image,
                                    is_jpeg_stream, jpeg_frame_is_progressive)
from tests import hostile
from tests.helpers import ROOT, encode_image

SPEC = InputSpec(channels=1, height=28, width=28, mean=(0.2860,), std=(0.3530,))


def photo(width: int, height: int) -> Image.Image:
    """A dark digit on lit paper, at phone-camera size."""
    paper = Image.fromarray(255 - hostile.digit(64)).resize((width, height), Image.Resampling.BILINEAR)
    return paper.convert("RGB")


def test_mpo_phone_photo_passes_like_the_same_pixels_as_jpeg():
    picture = photo(4000, 3000)
    jpeg = encode_image(picture, "JPEG", quality=60)
    mpo = hostile.mpo([picture, photo(1000, 750)], quality=60)  # primary picture + a gain map
    as_jpeg, as_mpo = decode(jpeg), decode(mpo)
    assert as_mpo.format == "MPO" and as_jpeg.format == "JPEG"
    assert as_mpo.gray.shape == as_jpeg.gray.shape == (375, 500)  # scaled by libjpeg, then averaged
    assert np.array_equal(as_mpo.gray, as_jpeg.gray)
    assert np.array_equal(decode_image(mpo, SPEC), decode_image(jpeg, SPEC))


def test_mpo_with_many_scans_is_refused_before_decoding():
    body = hostile.mpo_with_scans(1500)
    with Image.open(io.BytesIO(body)) as image:  # a valid MPO: both pictures found
        assert image.format == "MPO" and image.n_frames == 2
    started = time.process_time()
    with pytest.raises(InvalidInput, match="1500 scans exceeds the limit of 64") as caught:
        decode(body)
    assert caught.value.status == 413 and time.process_time() - started < 0.05


def test_jpeg_compressed_tiff_meets_the_scan_limit():
    real = hostile.tiff(hostile.digit(), compression="jpeg")
    assert decode(real).format == "TIFF"
    padded = real + b"\xff\xda\x00\x02" * (MAX_JPEG_SCANS + 1)  # scans past the image's data
    with pytest.raises(InvalidInput, match="scans exceeds") as caught:
        decode(padded)
    assert caught.value.status == 413


def with_segment(jpeg: bytes, marker: int, payload: bytes) -> bytes:
    """`jpeg` with one more marker segment right after its SOI."""
    return jpeg[:2] + bytes([0xFF, marker]) + (len(payload) + 2).to_bytes(2, "big") + payload + jpeg[2:]


def marker_cases() -> dict[str, bytes]:
    baseline = encode_image(Image.fromarray(hostile.digit()), "JPEG")
    progressive = encode_image(Image.fromarray(hostile.digit()), "JPEG", progressive=True)
    sof0 = baseline.index(b"\xff\xc0")
    return {
        "baseline": baseline,
        "progressive": progressive,
        "EXIF-wrapped": encode_image(Image.fromarray(hostile.digit()).convert("RGB"), "JPEG",
                                     exif=Image.Exif().tobytes()),
        "a SOF2 look-alike inside a comment": with_segment(baseline, 0xFE, b"\xff\xc2\xff\xc2"),
        "arithmetic progressive (SOF10)": baseline[:sof0] + b"\xff\xca" + baseline[sof0 + 2:],
        "arithmetic baseline (SOF9)": baseline[:sof0] + b"\xff\xc9" + baseline[sof0 + 2:],
        "no frame before the scan": baseline[:2] + baseline[baseline.index(b"\xff\xda"):],
        "progressive MPO": hostile.mpo([photo(64, 48), photo(32, 24)], progressive=True),
        "baseline MPO": hostile.mpo([photo(64, 48), photo(32, 24)]),
        "MPO with 1500 scans": hostile.mpo_with_scans(1500, side=64),
        "JPEG with 80 scans": hostile.jpeg_with_scans(80),
        "truncated": baseline[:5],
        "PNG": encode_image(hostile.digit(), "PNG"),
    }


def test_progressive_is_read_from_the_frame_header():
    cases = marker_cases()
    expected = {"baseline": False, "progressive": True, "EXIF-wrapped": False,
                "a SOF2 look-alike inside a comment": False, "arithmetic progressive (SOF10)": True,
                "arithmetic baseline (SOF9)": False, "no frame before the scan": None,
                "progressive MPO": True, "baseline MPO": False, "MPO with 1500 scans": True,
                "JPEG with 80 scans": True, "truncated": None, "PNG": None}
    assert {name: jpeg_frame_is_progressive(body) for name, body in cases.items()} == expected
    assert not is_jpeg_stream(cases["PNG"]) and is_jpeg_stream(cases["baseline MPO"])


def test_page_reads_jpeg_containers_like_the_server():
    """web/preprocessing.js's byte rules under Node, against Python's on the same bodies."""
    node = shutil.which("node")
    if node is None:
        pytest.fail("node not found: run `make install` (it installs Debian's nodejs)")
    cases = marker_cases()
    script = """
        import * as m from MODULE;
        let text = ""; for await (const chunk of process.stdin) text += chunk;
        const out = {};
        for (const [name, b64] of Object.entries(JSON.parse(text))) {
          const bytes = Uint8Array.from(Buffer.from(b64, "base64"));
          out[name] = [m.isJpegStream(bytes), m.jpegFrameIsProgressive(bytes), m.jpegScans(bytes)];
        }
        console.log(JSON.stringify(out));""".replace("MODULE", json.dumps((ROOT / "web" / "preprocessing.js").as_uri()))
    result = subprocess.run([node, "--input-type=module", "-e", script], capture_output=True, text=True,
                            timeout=60, input=json.dumps({k: base64.b64encode(v).decode() for k, v in cases.items()}))
    assert result.returncode == 0, result.stderr
    page = json.loads(result.stdout)
    server = {name: [is_jpeg_stream(body), jpeg_frame_is_progressive(body), body.count(b"\xff\xda")]
              for name, body in cases.items()}
    assert page == server
    assert page["MPO with 1500 scans"][2] == 1500 > MAX_JPEG_SCANS
