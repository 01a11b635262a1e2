"""Trust and durability: signed archives, an archive read as TorchServe reads it, exports that a
kill leaves consistent, and the files a served model leaves on the host."""
from __future__ import annotations

import json
import re
import shutil
import signal
import stat
import struct
import subprocess
import sys
import threading
import time
import zipfile
import zlib
from pathlib import Path

import psutil
import pytest

from contract.bundle import BUNDLE_FILE, load_bundle, sha256_bytes, verify_recorded_files
from export import signing
from export.signing import SIGNATURE_NAME, SignatureError, create_key_pair
from export.verify import ArchiveError, unpack, verify_archive
from serve.client import Server, read_properties
from tests.helpers import DATA_DIR, ROOT, report, rewrite, run_module, serve, serve_config


# ---------------------------------------------------------------- archives, rewritten as an attacker would

def raw_zip(path: Path, members: list[dict]) -> Path:
    """A zip written byte by byte, so that headers can say what zipfile would never write.
    Each member: name, data (as stored), and optionally method, crc, size (declared), attr
    (external attributes), hidden (in the local headers only, not the central directory)."""
    local, central, listed = b"", b"", 0
    for m in members:
        name, data = m["name"].encode(), m["data"]
        method, crc, size = m.get("method", 0), m.get("crc", zlib.crc32(data)), m.get("size", len(data))
        offset = len(local)
        local += struct.pack("<IHHHHHIIIHH", 0x04034B50, 20, 0, method, 0, 0x21, crc, len(data), size,
                             len(name), 0) + name + data
        if not m.get("hidden"):
            central += struct.pack("<IHHHHHHIIIHHHHHII", 0x02014B50, 0x031E, 20, 0, method, 0, 0x21, crc,
                                   len(data), size, len(name), 0, 0, 0, 0, m.get("attr", 0o100644 << 16),
                                   offset) + name
            listed += 1
    end = struct.pack("<IHHHHIIH", 0x06054B50, 0, 0, listed, listed, len(central), len(local), 0)
    path.write_bytes(local + central + end)
    return path


def deflated(data: bytes) -> bytes:
    compressor = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    return compressor.compress(data) + compressor.flush()


@pytest.mark.slow
def test_the_signed_archive_verifies_and_carries_its_signature(tiny, signing_keys):
    with zipfile.ZipFile(tiny.mar) as mar:
        names = mar.namelist()
    assert SIGNATURE_NAME in names
    assert not any(name.endswith((".pem", ".key")) for name in names)  # never the private key
    bundle = verify_archive(tiny.mar, signing_keys.public)
    assert bundle == load_bundle(tiny.build_dir)


@pytest.mark.slow
def test_an_edited_handler_is_refused_by_name(tiny, signing_keys, tmp_path, refuse_model_loading):
    with zipfile.ZipFile(tiny.mar) as mar:
        handler = mar.read("mnist_handler.py")
    edited = rewrite(tiny.mar, tmp_path / "mnist.mar",
                     replace={"mnist_handler.py": handler + b"\nimport os; os.system('id')\n"})
    with pytest.raises(SignatureError, match=r"changed after signing.*mnist_handler\.py"):
        verify_archive(edited, signing_keys.public)


@pytest.mark.slow
def test_a_swapped_model_with_recomputed_hashes_is_refused(tiny, signing_keys, tmp_path,
                                                          refuse_model_loading):
    """The attack the SHA-256 in bundle.json alone cannot stop: swap the model and fix bundle.json."""
    with zipfile.ZipFile(tiny.mar) as mar:
        bundle = json.loads(mar.read(BUNDLE_FILE))
    other = (tiny.build_dir / "model.onnx").read_bytes()  # any other model file
    bundle["files"]["model.pt"]["sha256"] = sha256_bytes(other)
    bundle["files"]["model.pt"]["bytes"] = len(other)
    swapped = rewrite(tiny.mar, tmp_path / "mnist.mar",
                      replace={"model.pt": other, BUNDLE_FILE: json.dumps(bundle).encode()})
    with pytest.raises(SignatureError) as refused:
        verify_archive(swapped, signing_keys.public)
    assert "model.pt" in str(refused.value) and BUNDLE_FILE in str(refused.value)


@pytest.mark.slow
def test_an_added_or_removed_file_is_refused_by_name(tiny, signing_keys, tmp_path, refuse_model_loading):
    added = rewrite(tiny.mar, tmp_path / "added.mar", add={"contract/sitecustomize.py": b"print(1)\n",
                                                                ".gitattributes": b"* binary\n"})
    with pytest.raises(SignatureError, match=r"added after signing.*contract/sitecustomize\.py") as refused:
        verify_archive(added, signing_keys.public)
    assert ".gitattributes" in str(refused.value)  # model-signing's default would skip .git* files
    removed = rewrite(tiny.mar, tmp_path / "removed.mar", drop=("model-config.yaml",))
    with pytest.raises(SignatureError, match=r"removed after signing: model-config\.yaml"):
        verify_archive(removed, signing_keys.public)


@pytest.mark.slow
def test_another_signer_or_no_signature_is_refused(tiny, signing_keys, tmp_path, refuse_model_loading):
    _, stranger = create_key_pair(tmp_path / "stranger")
    with pytest.raises(SignatureError, match="not signed by the configured public key"):
        verify_archive(tiny.mar, stranger)
    unsigned = rewrite(tiny.mar, tmp_path / "unsigned.mar", drop=(SIGNATURE_NAME,))
    with pytest.raises(SignatureError, match="carries no signature"):
        verify_archive(unsigned, signing_keys.public)


@pytest.mark.slow
def test_with_no_public_key_configured_it_says_so(tiny, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv(signing.PUBLIC_KEY_ENV, "")
    monkeypatch.setattr(signing, "KEY_DIR", tmp_path / "no-keys-here")
    with pytest.raises(SignatureError, match="no public key is configured.*--allow-unsigned"):
        verify_archive(tiny.mar)
    verify_archive(tiny.mar, allow_unsigned=True, run_self_test=False)
    said = capsys.readouterr().out
    assert "WARNING: no public key is configured" in said and "UNSIGNED" in said


@pytest.mark.parametrize("name", ["../outside.py", "/etc/evil.py", "contract/../../outside.py", "C:/evil.py"])
def test_paths_out_of_the_archive_are_refused(tmp_path, name):
    mar = raw_zip(tmp_path / "m.mar", [{"name": "bundle.json", "data": b"{}"}, {"name": name, "data": b"x"}])
    with pytest.raises(ArchiveError, match="name|component"):
        unpack(mar, tmp_path / "out")
    assert not (tmp_path / "outside.py").exists()


@pytest.mark.slow
def test_duplicate_entries_are_refused(tiny, tmp_path):
    """ZipInputStream (TorchServe) keeps the last copy of a repeated name, zipfile the first."""
    with zipfile.ZipFile(tiny.mar) as mar:
        handler = mar.read("mnist_handler.py")
    duplicated = tmp_path / "dup.mar"
    with pytest.warns(UserWarning, match="Duplicate name"):
        rewrite(tiny.mar, duplicated, add={"mnist_handler.py": handler + b"\n# second copy\n"})
    with pytest.raises(ArchiveError, match=r"'mnist_handler\.py' appears twice"):
        verify_archive(duplicated)


def test_links_and_entries_hidden_from_the_listing_are_refused(tmp_path):
    link = raw_zip(tmp_path / "link.mar", [{"name": "model.pt", "data": b"/etc/passwd",
                                            "attr": (stat.S_IFLNK | 0o777) << 16}])
    with pytest.raises(ArchiveError, match="link"):
        unpack(link, tmp_path / "a")
    hidden = raw_zip(tmp_path / "hidden.mar", [{"name": "evil.py", "data": b"x", "hidden": True},
                                                {"name": "bundle.json", "data": b"{}"}])
    with pytest.raises(ArchiveError, match="bytes before or between members"):
        unpack(hidden, tmp_path / "b")
    prepended = tmp_path / "prepended.mar"
    prepended.write_bytes(b"#!/bin/sh\n" + raw_zip(tmp_path / "plain.mar", [{"name": "a", "data": b"x"}]).read_bytes())
    with pytest.raises(ArchiveError):
        unpack(prepended, tmp_path / "c")


def test_a_zip_bomb_is_refused_with_memory_bounded(tmp_path):
    zeros = b"\0" * (64 << 20)
    bomb = deflated(zeros)  # 64 MiB in about 64 KiB
    honest = raw_zip(tmp_path / "honest.mar", [{"name": "bomb.bin", "data": bomb, "method": 8,
                                                "crc": zlib.crc32(zeros), "size": len(zeros)}])
    with pytest.raises(ArchiveError, match=r"'bomb\.bin' inflates .* \(over 100:1\)"):
        unpack(honest, tmp_path / "a")
    # A header that understates the size: the copy stops one chunk past what it declared.
    lying = raw_zip(tmp_path / "lying.mar", [{"name": "bomb.bin", "data": bomb, "method": 8,
                                              "crc": 0, "size": 1000}])
    peak = measure_peak_rss_mib(lying, tmp_path / "b")
    assert "inflates beyond the 1,000 bytes it declares" in peak.stderr, peak.stderr
    written = sum(p.stat().st_size for p in (tmp_path / "b").rglob("*") if p.is_file())
    assert written <= 2 << 20
    report(f"zip bomb (64 MiB of zeros in {len(bomb) / 1024:.0f} KiB, size understated): refused after "
           f"writing {written / 1024:.0f} KiB; peak RSS of the unpacking process {peak.rss_mib:.0f} MiB")
    assert peak.rss_mib < 100, peak.rss_mib


def measure_peak_rss_mib(mar: Path, dest: Path):
    """unpack() in a process of its own; its peak resident memory (VmHWM: ru_maxrss would carry
    the forking pytest process's peak over the exec)."""
    code = ("import re, sys; from pathlib import Path; from export.verify import unpack\n"
            "try:\n    unpack(Path(sys.argv[1]), Path(sys.argv[2]))\n"
            "except Exception as e:\n    print(e, file=sys.stderr)\n"
            "print(re.search(r'VmHWM:\\s+(\\d+)', open('/proc/self/status').read()).group(1))")
    result = subprocess.run([sys.executable, "-c", code, str(mar), str(dest)], cwd=ROOT,
                            capture_output=True, text=True, timeout=120)
    result.rss_mib = int(result.stdout.split()[-1]) / 1024
    return result


@pytest.mark.slow
def test_verify_on_the_command_line_names_the_file(tiny, tmp_path):
    with zipfile.ZipFile(tiny.mar) as mar:
        handler = mar.read("mnist_handler.py")
    edited = rewrite(tiny.mar, tmp_path / "mnist.mar", replace={"mnist_handler.py": handler + b"\n"})
    result = run_module("export", "verify", str(edited), check=False)
    assert result.returncode != 0 and "mnist_handler.py" in result.stderr, result.stderr


# ---------------------------------------------------------------- make serve: the refusal, the files it leaves

@pytest.mark.slow
def test_serve_refuses_a_tampered_archive_before_torchserve_starts(tiny, tmp_path):
    with zipfile.ZipFile(tiny.mar) as mar:
        handler = mar.read("mnist_handler.py")
    store = tmp_path / "store"
    store.mkdir()
    rewrite(tiny.mar, store / "mnist.mar", replace={"mnist_handler.py": handler + b"print('pwned')\n"})
    workdir = tmp_path / "run"
    result = serve("start", "--model-store", str(store), workdir=workdir,
                   config=serve_config(tmp_path / "c.properties"), check=False)
    assert result.returncode != 0
    assert "refusing to serve" in result.stderr and "mnist_handler.py" in result.stderr, result.stderr
    assert not (workdir / "key_file.json").exists()  # TorchServe mints it at its start
    assert not (workdir / "logs" / "private" / "tmp").exists()  # its pid file and sockets
    assert not (workdir / "logs" / "private" / "model_store" / "mnist.mar").exists()


@pytest.mark.torchserve
@pytest.mark.slow
def test_serve_keeps_its_files_private_and_stop_waits_for_the_exit(tiny, tmp_path):
    workdir, config = tmp_path / "run", serve_config(tmp_path / "c.properties")
    serve("start", "--model-store", str(tiny.model_store), workdir=workdir, config=config)
    try:
        key_file = workdir / "key_file.json"
        assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
        private = workdir / "logs" / "private"
        assert stat.S_IMODE(private.stat().st_mode) == 0o700
        sockets = list((private / "tmp").glob(".ts.sock.*"))
        assert sockets and (private / "tmp" / ".model_server.pid").exists()
        pid = int((private / "tmp" / ".model_server.pid").read_text())
        frontend = psutil.Process(pid)
        grpc_api = psutil.Process(int((private / "grpc-server.pid").read_text()))
        family = [frontend, *frontend.children(recursive=True), grpc_api]
        effective = read_properties(private / "config.properties")
        # config.properties' gRPC ports are the gRPC API's; TorchServe's own listener is elsewhere.
        asked = read_properties(config)
        assert effective["grpc_inference_port"] != asked["grpc_inference_port"]
        assert effective["grpc_management_port"] != asked["grpc_management_port"]
        store = str(private / "model_store")  # the verified read-only copy (serve/trust.py)
        assert effective["model_store"] == store
        allowed = re.compile(effective["allowed_urls"].replace("\\\\", "\\"))  # as Java reads it
        assert allowed.match(f"file://{store}/mnist.mar")
        for elsewhere in (f"file://{store}/../x.mar", "file:///tmp/model_store/mnist.mar",
                          f"file://{store}/sub/x.mar", f"http://example.com/{store}/mnist.mar"):
            assert not allowed.match(elsewhere), elsewhere

        keys = json.loads(key_file.read_text())
        token = serve("token", workdir=workdir, config=config).stdout.strip()
        assert token == keys["inference"]["key"]
        assert keys["API"]["key"] not in token and keys["management"]["key"] not in token
        (tmp_path / "inference.key").write_text(token + "\n")
        predicted = serve("predict", str(tiny.build_dir / "samples" / "test0000-ankle-boot.png"),
                          "--inference-key-file", str(tmp_path / "inference.key"), workdir=workdir, config=config)
        assert "label" in predicted.stdout
        over_grpc = serve("predict", "--grpc", str(tiny.build_dir / "samples" / "test0000-ankle-boot.png"),
                          workdir=workdir, config=config)
        assert over_grpc.stdout.split(": ", 1)[1] == predicted.stdout.split(": ", 1)[1]
        assert_concurrent_renewals_rotate_once(Server.from_config(config, workdir))
    finally:
        started = time.monotonic()
        stopped = serve("stop", workdir=workdir, config=config, check=False)
        took = time.monotonic() - started
    assert stopped.returncode == 0, stopped.stderr
    still = [p.pid for p in family if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    assert not still, f"make stop returned while {still} still ran"
    report(f"make stop: returned after the server's {len(family)} processes had exited, "
           f"{took:.1f} s including the command's start ({stopped.stdout.strip().splitlines()[-1]})")


def assert_concurrent_renewals_rotate_once(server: Server) -> None:
    """Four clients find the same key refused at once: one renewal, and all four get its key."""
    stale = server.key("inference")
    barrier, results = threading.Barrier(4), []

    def renew():
        barrier.wait()
        results.append(server.renew_key("inference", refused=stale))

    threads = [threading.Thread(target=renew) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(set(results)) == 1 and results[0] != stale, results
    assert results[0] == server.key("inference")
    assert stat.S_IMODE(server.key_file.stat().st_mode) == 0o600  # still private after the rewrite


@pytest.mark.torchserve
@pytest.mark.slow
def test_the_suite_servers_key_file_is_private(torchserve, server):
    """TorchServeProcess (the tests' and benchmarks' servers) starts TorchServe with umask 077 too."""
    assert stat.S_IMODE(server.key_file.stat().st_mode) == 0o600


# ---------------------------------------------------------------- a kill at each step of each stage

# Runs `python -m export ...` with os.<target> wrapped to SIGKILL the process just before its
# Nth call: before the Nth rename (os.replace), or before the Nth fsync (mid-write of a file).
KILLER = """
import os, runpy, signal, sys
target, nth = sys.argv[1], int(sys.argv[2])
real, calls = getattr(os, target), [0]
def wrapper(*args, **kwargs):
    calls[0] += 1
    if calls[0] == nth:
        os.kill(os.getpid(), signal.SIGKILL)
    return real(*args, **kwargs)
setattr(os, target, wrapper)
sys.argv = ["python -m export", *sys.argv[3:]]
runpy.run_module("export", run_name="__main__", alter_sys=True)
"""


def export_killed_at(target: str, nth: int, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", KILLER, target, str(nth), *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=600)


def assert_build_consistent(build: Path) -> str:
    """bundle.json absent (an export in progress, which archive refuses) or true about every
    file it records; 'complete' or 'no contract'."""
    if not (build / BUNDLE_FILE).exists():
        return "no contract"
    verify_recorded_files(load_bundle(build), build)  # raises BundleError naming the file
    return "complete"


def stale_temporaries(folder: Path) -> list[str]:
    return [p.name for p in folder.iterdir() if p.name.startswith(".")]


# (stage, what is wrapped, before which call): build renames model.pt, model.onnx, then bundle.json
# (the old bundle.json is already gone before the first);
# ort renames bundle.json (forgetting the old files), model.ort, the operators list, bundle.json.
KILL_POINTS = [("build", "replace", 1), ("build", "replace", 2),
               ("ort", "replace", 2), ("ort", "replace", 3), ("quantize", "fsync", 1),
               ("archive", "fsync", 1), ("archive", "replace", 1)]


@pytest.mark.slow
@pytest.mark.parametrize("stage,target,nth", KILL_POINTS)
def test_a_kill_at_any_step_leaves_build_consistent(tiny, tmp_path, stage, target, nth):
    build, store = tmp_path / "build", tmp_path / "store"
    shutil.copytree(tiny.build_dir, build)
    if stage == "ort":
        run_module("export", "ort", "--build-dir", str(build))  # old files, for the kill to interrupt replacing
    if stage == "archive":
        store.mkdir()
        shutil.copy2(tiny.mar, store / "mnist.mar")
    before = (store / "mnist.mar").read_bytes() if stage == "archive" else None
    args = {"build": ["build", "--checkpoint", str(tiny.checkpoint), "--data-dir", str(DATA_DIR),
                      "--check-images", "64"],
            "ort": ["ort"], "quantize": ["quantize", "--data-dir", str(DATA_DIR)],
            "archive": ["archive", "--model-store", str(store)]}[stage]
    killed = export_killed_at(target, nth, *args, "--build-dir", str(build))
    assert killed.returncode == -signal.SIGKILL, f"not killed at {target} #{nth}: {killed.stderr[-2000:]}"
    state = assert_build_consistent(build)
    if stage == "archive":
        after = (store / "mnist.mar").read_bytes()
        assert after == before, "a killed archive step changed the served archive"
    if state == "no contract":
        refused = run_module("export", "archive", "--build-dir", str(build), "--model-store", str(store),
                             check=False)
        assert refused.returncode != 0 and "run `make export`" in refused.stderr, refused.stderr
    if (stage, target, nth) == ("build", "replace", 2):
        # The same command again finishes the job and sweeps what the killed one left.
        assert stale_temporaries(build)
        run_module("export", *args, "--build-dir", str(build))
        assert assert_build_consistent(build) == "complete" and not stale_temporaries(build)
    report(f"kill before {target} #{nth} in export {stage}: build/ {state}")


@pytest.mark.slow
def test_archive_refuses_a_build_whose_hashes_do_not_match(tiny, tmp_path):
    from export.main import checked_build
    build = tmp_path / "build"
    shutil.copytree(tiny.build_dir, build)
    with open(build / "model.pt", "ab") as f:
        f.write(b"\0")
    with pytest.raises(SystemExit, match=r"refusing to archive .*model\.pt has SHA-256"):
        checked_build(build, "torchscript")
