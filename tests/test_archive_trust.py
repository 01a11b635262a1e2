"""Archives a host can trust: a signed release (model version, build time) and no rollback, the
pinned digest, the verified copy is the served copy, and key files others cannot replace.

Each attack is done for real and the test checks both the refusal and that nothing ran: no
TorchServe (no key_file.json, no pid file), no handler code (its marker file is absent)."""
from __future__ import annotations

import json
import re
import os
import stat
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from contract.bundle import sha256_file
from export import signing
from export.release import RELEASE_FILE, next_version
from export.signing import KeyPermissionError, SignatureError, check_public_key, create_key_pair
from export.verify import verify_archive, verify_archive_release
from serve.client import read_properties
from serve.trust import STATE_DIR_ENV, ServedState, TrustError
from tests.helpers import ROOT, report, run_module
# Fixtures (tiny: a model trained on 2,000 images, archived and signed) and attack helpers shared
# with the signing tests; pytest registers an imported fixture under its own name.
from tests.helpers import rewrite, serve, serve_config

STRANGER_UID = 4242  # a user who is neither the test's nor root


def marker_handler(mar: Path, marker: Path) -> bytes:
    """The archive's handler with a line that, when TorchServe imports it, creates `marker`."""
    with zipfile.ZipFile(mar) as archive:
        handler = archive.read("mnist_handler.py")
    return handler + f"\nimport pathlib; pathlib.Path({str(marker)!r}).write_text('handler code ran')\n".encode()


def assert_torchserve_never_started(workdir: Path) -> None:
    assert not (workdir / "key_file.json").exists(), "TorchServe started (it wrote key_file.json)"
    assert not (workdir / "logs" / "private" / "tmp" / ".model_server.pid").exists()
    assert not (workdir / "logs" / "ts_log.log").exists()


def archive_as(tiny, store: Path, *args: str, env=None) -> Path:
    run_module("export", "archive", "--build-dir", str(tiny.build_dir), "--model-store", str(store), *args,
               env=env)
    return store / "mnist.mar"


def release_of(mar: Path) -> dict:
    with zipfile.ZipFile(mar) as archive:
        return json.loads(archive.read(RELEASE_FILE))


@pytest.fixture
def state(tmp_path, monkeypatch):
    """A serving state of this test's own, for the commands it runs and for this process."""
    folder = tmp_path / "state"
    monkeypatch.setenv(STATE_DIR_ENV, str(folder))
    return ServedState(folder)


# ---------------------------------------------------------------- 4. the release, signed; rollback refused

@pytest.mark.slow
def test_the_release_is_signed_with_the_archive(tiny, signing_keys, tmp_path, refuse_model_loading):
    release = release_of(tiny.mar)
    assert type(release["model_version"]) is int and release["model_version"] >= 20260101000000
    assert release["built_at"].endswith("Z") and release["model_name"] == "mnist"
    with zipfile.ZipFile(tiny.mar) as archive:
        manifest = json.loads(archive.read("MAR-INF/MANIFEST.json"))
    assert manifest["model"]["modelVersion"] == str(release["model_version"])
    verified = verify_archive_release(tiny.mar, signing_keys.public, run_self_test=False)
    assert verified.release == release and verified.sha256 == sha256_file(tiny.mar)
    # The attack: the same signed archive, its version raised to pass as the newest.
    bumped = rewrite(tiny.mar, tmp_path / "bumped.mar", replace={
        RELEASE_FILE: json.dumps({**release, "model_version": release["model_version"] + 10**6}).encode()})
    with pytest.raises(SignatureError, match=r"changed after signing.*release\.json"):
        verify_archive(bumped, signing_keys.public)
    unversioned = rewrite(tiny.mar, tmp_path / "unversioned.mar", drop=(RELEASE_FILE,))
    with pytest.raises(SignatureError, match=r"removed after signing: release\.json"):
        verify_archive(unversioned, signing_keys.public)


@pytest.mark.slow
def test_the_default_version_grows_past_the_store_and_an_explicit_one_is_kept(tiny, tmp_path):
    store = tmp_path / "store"
    explicit = archive_as(tiny, store, "--model-version", "99990101000000")
    assert release_of(explicit)["model_version"] == 99990101000000
    assert release_of(archive_as(tiny, store))["model_version"] == 99990101000001  # above, not the clock
    lower = run_module("export", "archive", "--build-dir", str(tiny.build_dir), "--model-store", str(store),
                       "--model-version", "7")
    assert "WARNING: model version 7 is not above 99990101000001" in lower.stdout
    refused = run_module("export", "archive", "--build-dir", str(tiny.build_dir), "--model-store",
                         str(store), "--model-version", "0", check=False)
    assert refused.returncode != 0 and "positive integer" in refused.stderr
    import datetime
    moment = datetime.datetime(2026, 12, 2, 0, 15, 0, tzinfo=datetime.timezone.utc)
    assert next_version(moment, None) == 20261202001500 and next_version(moment, 20261202001500) == 20261202001501


def test_state_refuses_older_and_same_version_other_bytes(state):
    new = {"model_version": 5, "built_at": "2026-12-02T00:00:00Z"}
    old = {"model_version": 4, "built_at": "2026-12-01T00:00:00Z"}
    assert "first release" in state.check("mnist", old, "a" * 64, allow_rollback=False)
    state.record("mnist", new, "b" * 64)
    assert stat.S_IMODE(state.folder.stat().st_mode) == 0o700
    assert stat.S_IMODE(state.path.stat().st_mode) == 0o600
    with pytest.raises(TrustError, match="refusing a rollback.*version 4.*older than version 5"):
        state.check("mnist", old, "a" * 64, allow_rollback=False)
    with pytest.raises(TrustError, match="model version 5.*other bytes.*two archives claim one version"):
        state.check("mnist", new, "c" * 64, allow_rollback=False)
    assert "highest served" in state.check("mnist", new, "b" * 64, allow_rollback=False)  # a restart
    assert "ROLLBACK allowed" in state.check("mnist", old, "a" * 64, allow_rollback=True)
    state.record("mnist", old, "a" * 64)  # an allowed rollback does not lower the floor
    assert state.highest("mnist").model_version == 5
    assert not list(state.folder.glob(".*partial"))


@pytest.mark.parametrize("damage", ["truncated", "not json", "wrong format", "others can write", "other owner"])
def test_a_damaged_state_file_is_an_error_not_a_reset(state, damage):
    state.record("mnist", {"model_version": 5, "built_at": "2026-12-02T00:00:00Z"}, "b" * 64)
    text = state.path.read_text()
    if damage == "truncated":
        state.path.write_text(text[: len(text) // 2])
    elif damage == "not json":
        state.path.write_bytes(b"\xff\xfe garbage")
    elif damage == "wrong format":
        state.path.write_text(json.dumps({"format": 99, "models": {}}))
    elif damage == "others can write":
        os.chmod(state.path, 0o666)
    else:
        os.chown(state.path, STRANGER_UID, -1)
    expected = {"others can write": r"writable by others.*chmod 600", "other owner": r"uid 4242.*chown"}
    with pytest.raises(TrustError, match=expected.get(damage, r"corrupt.*guards against rollbacks.*--expect-sha256")):
        state.check("mnist", {"model_version": 1, "built_at": "2020-01-01T00:00:00Z"}, "a" * 64, False)


@pytest.mark.slow
def test_serve_refuses_a_rollback_and_a_wrong_digest_before_torchserve_starts(tiny, tmp_path, state):
    """Real `serve start` commands: the newest release served is recorded; an older archive signed
    by the same key, or any archive but the pinned one, is refused and TorchServe never starts."""
    store = tmp_path / "store"
    old = archive_as(tiny, store, "--model-version", "3")
    old_bytes = old.read_bytes()
    state.record("mnist", {"model_version": 4, "built_at": "2026-12-02T00:00:00Z"}, "e" * 64)
    config = serve_config(tmp_path / "c.properties")
    workdir = tmp_path / "run"
    refused = serve("start", "--model-store", str(store), workdir=workdir, config=config, check=False)
    assert refused.returncode != 0
    assert "refusing a rollback" in refused.stderr and "version 3" in refused.stderr, refused.stderr
    assert "TorchServe was not started" in refused.stderr
    assert_torchserve_never_started(workdir)
    assert old.read_bytes() == old_bytes
    wrong = serve("start", "--model-store", str(store), "--expect-sha256", "0" * 64, "--allow-rollback",
                  workdir=workdir, config=config, check=False)
    assert wrong.returncode != 0 and f"SHA-256 {sha256_file(old)}, not the pinned {'0' * 64}" in wrong.stderr
    assert_torchserve_never_started(workdir)
    malformed = serve("start", "--model-store", str(store), "--expect-sha256", "abc", workdir=workdir,
                      config=config, check=False)
    assert malformed.returncode != 0 and "not a SHA-256 digest" in malformed.stderr
    assert_torchserve_never_started(workdir)
    state.path.write_text("{")
    corrupt = serve("start", "--model-store", str(store), workdir=workdir, config=config, check=False)
    assert corrupt.returncode != 0 and "is corrupt" in corrupt.stderr, corrupt.stderr
    assert_torchserve_never_started(workdir)


# ---------------------------------------------------------------- 5. the copy verified is the copy served

# `serve start` with an attacker at the worst moment: just after the archive was verified, they
# rename their own archive over model_store/mnist.mar (what TorchServe would have read).
SWAP_AFTER_VERIFY = """
import os, sys
from pathlib import Path
import serve.main
evil, store = sys.argv[1], Path(sys.argv[2])
verified = serve.main.verify_before_serving
def then_swap(*args, **kwargs):
    result = verified(*args, **kwargs)
    os.replace(evil, store / "mnist.mar")
    print("[attacker] renamed my archive over", store / "mnist.mar", flush=True)
    return result
serve.main.verify_before_serving = then_swap
serve.main.main(sys.argv[3:])
"""


@pytest.mark.slow
@pytest.mark.torchserve
def test_an_archive_renamed_over_the_store_after_the_check_is_not_served(tiny, tmp_path, state):
    store, workdir, marker = tmp_path / "store", tmp_path / "run", tmp_path / "handler-ran"
    store.mkdir()
    good = store / "mnist.mar"
    good.write_bytes(tiny.mar.read_bytes())
    digest = sha256_file(good)
    evil = rewrite(tiny.mar, tmp_path / "evil.mar", replace={"mnist_handler.py": marker_handler(tiny.mar, marker)})
    config = serve_config(tmp_path / "c.properties")
    started = subprocess.run(
        [sys.executable, "-c", SWAP_AFTER_VERIFY, str(evil), str(store), "start", "--model-store", str(store),
         "--expect-sha256", digest, "--workdir", str(workdir), "--config", str(config)],
        cwd=ROOT, capture_output=True, text=True, timeout=300)
    try:
        assert started.returncode == 0, started.stderr[-3000:]
        assert "[attacker] renamed my archive over" in started.stdout
        assert sha256_file(good) != digest  # the swap happened
        assert not marker.exists(), "the archive renamed in after the check was served: its code ran"
        private = workdir / "logs" / "private"
        served = private / "model_store" / "mnist.mar"
        assert read_properties(private / "config.properties")["model_store"] == str(served.parent)
        assert sha256_file(served) == digest
        assert stat.S_IMODE(served.stat().st_mode) == 0o400
        assert stat.S_IMODE(served.parent.stat().st_mode) == 0o700
        predicted = serve("predict", str(tiny.build_dir / "samples" / "test0000-ankle-boot.png"),
                          workdir=workdir, config=config)
        assert "label" in predicted.stdout
        assert not marker.exists()
        assert state.highest("mnist").sha256 == digest  # what was served is recorded
    finally:
        stopped = serve("stop", workdir=workdir, config=config, check=False)
    assert stopped.returncode == 0, stopped.stderr


# ---------------------------------------------------------------- 7. key files only their owner can change

def test_a_key_others_can_replace_is_refused_with_the_fix(tmp_path):
    folder = tmp_path / "keys"
    _, public = create_key_pair(folder)
    assert stat.S_IMODE(folder.stat().st_mode) == 0o700 and stat.S_IMODE(public.stat().st_mode) == 0o644
    check_public_key(public)
    os.chmod(public, 0o664)
    with pytest.raises(KeyPermissionError, match=rf"writable by its group \(mode 0664\).*`chmod 0644 {public}`"):
        check_public_key(public)
    os.chmod(public, 0o644)
    os.chmod(folder, 0o777)
    with pytest.raises(KeyPermissionError,
                       match=rf"folder {folder} is writable by its group and others.*`chmod 0755 {folder}`"):
        check_public_key(public)
    os.chmod(folder, 0o1777)  # sticky, like /tmp: others cannot rename what is ours in it
    check_public_key(public)
    os.chmod(folder, 0o700)
    os.chown(public, STRANGER_UID, -1)
    with pytest.raises(KeyPermissionError, match=rf"belongs to uid {STRANGER_UID}.*chown {os.geteuid()} {public}"):
        check_public_key(public)
    os.chown(public, os.geteuid(), -1)
    # A Kubernetes secret mounts links into a timestamped folder: the target and its folders count.
    real = tmp_path / "secret" / "..2026_12_02" / "signing-key.pub"
    real.parent.mkdir(parents=True)
    real.write_bytes(public.read_bytes())
    os.chmod(real, 0o644)
    link = tmp_path / "secret" / "signing-key.pub"
    link.symlink_to(real)
    check_public_key(link)
    os.chmod(real.parent, 0o777)
    with pytest.raises(KeyPermissionError, match=r"\.\.2026_12_02 is writable"):
        check_public_key(link)


@pytest.mark.slow
def test_a_public_key_replaced_by_another_user_is_refused_and_nothing_runs(tiny, tmp_path, monkeypatch):
    """The attack of issue 23: a world-writable key folder; another user puts their public key
    there and their own signed archive in the store. `serve start` refuses and starts nothing."""
    folder = tmp_path / "shared-keys"
    folder.mkdir()
    os.chmod(folder, 0o777)
    stranger_private, stranger_public = create_key_pair(tmp_path / "stranger")
    trusted = folder / "signing-key.pub"
    trusted.write_bytes(stranger_public.read_bytes())
    os.chown(trusted, STRANGER_UID, STRANGER_UID)
    marker = tmp_path / "handler-ran"
    store = tmp_path / "store"
    store.mkdir()
    theirs = rewrite(tiny.mar, store / "mnist.mar", drop=(signing.SIGNATURE_NAME,),
                     replace={"mnist_handler.py": marker_handler(tiny.mar, marker)})
    monkeypatch.setenv(signing.PRIVATE_KEY_ENV, str(stranger_private))
    from export.main import sign_archive
    work = tmp_path / "work"
    work.mkdir()
    assert sign_archive(theirs, work)  # their archive, signed by their key: it verifies against it
    env = {signing.PUBLIC_KEY_ENV: str(trusted), STATE_DIR_ENV: str(tmp_path / "state")}
    workdir = tmp_path / "run"
    refused = serve("start", "--model-store", str(store), workdir=workdir,
                    config=serve_config(tmp_path / "c.properties"), check=False, env=env)
    assert refused.returncode != 0
    assert f"folder {folder} is writable by its group and others" in refused.stderr, refused.stderr
    assert "chmod 0755" in refused.stderr
    assert_torchserve_never_started(workdir)
    os.chmod(folder, 0o755)  # the folder fixed, the file is still theirs
    refused = serve("start", "--model-store", str(store), workdir=workdir,
                    config=serve_config(tmp_path / "c.properties"), check=False, env=env)
    assert refused.returncode != 0 and f"public key {trusted} belongs to uid {STRANGER_UID}" in refused.stderr
    assert_torchserve_never_started(workdir)
    assert not marker.exists()


@pytest.mark.slow
def test_a_private_key_others_can_read_signs_nothing(tiny, tmp_path, monkeypatch):
    private, _ = create_key_pair(tmp_path / "keys")
    os.chmod(private, 0o640)
    store = tmp_path / "store"
    before = sorted(tmp_path.rglob("*.mar"))
    refused = run_module("export", "archive", "--build-dir", str(tiny.build_dir), "--model-store", str(store),
                         check=False, env={signing.PRIVATE_KEY_ENV: str(private)})
    assert refused.returncode != 0
    assert f"private key {private} is readable or writable by others (mode 0640)" in refused.stderr
    assert f"`chmod 600 {private}`" in refused.stderr
    assert sorted(tmp_path.rglob("*.mar")) == before  # no archive written, signed or not


@pytest.mark.slow  # starts `python -m train`/`export`: seconds of imports and work
def test_make_keys_tightens_its_folder_or_refuses_one_it_cannot_trust(tmp_path):
    home = tmp_path / "home"
    folder = home / ".config" / "mnist-bundle"
    folder.mkdir(parents=True)
    os.chmod(folder, 0o777)
    made = run_module("export", "keys", env={"HOME": str(home)})
    assert "had mode 0777: now 0700" in made.stdout
    assert stat.S_IMODE(folder.stat().st_mode) == 0o700
    assert stat.S_IMODE((folder / "signing-key.pem").stat().st_mode) == 0o600
    check_public_key(folder / "signing-key.pub")

    theirs = tmp_path / "home2" / ".config" / "mnist-bundle"
    theirs.mkdir(parents=True)
    os.chmod(theirs, 0o777)
    os.chown(theirs, STRANGER_UID, STRANGER_UID)
    refused = run_module("export", "keys", check=False, env={"HOME": str(tmp_path / "home2")})
    assert refused.returncode != 0 and f"belongs to uid {STRANGER_UID}" in refused.stderr, refused.stderr
    assert not any(theirs.iterdir()), "a key was written into a folder another user owns"

    above = tmp_path / "home3" / ".config"
    above.mkdir(parents=True)
    os.chmod(above, 0o777)  # others could rename mnist-bundle away and put their own in its place
    refused = run_module("export", "keys", check=False, env={"HOME": str(tmp_path / "home3")})
    assert refused.returncode != 0 and f"folder {above} is writable by its group and others" in refused.stderr
    assert not (above / "mnist-bundle").exists()


# ---------------------------------------------------------------- 6. the container: verify, then become TorchServe

def foreground(store: Path, workdir: Path, config: Path, *args: str, env=None) -> subprocess.Popen:
    """`serve start --foreground` as the image's entrypoint runs it, in a process group of its own."""
    with open(workdir.parent / f"{workdir.name}.out", "wb") as log:
        return subprocess.Popen([sys.executable, "-m", "serve", "start", "--foreground", "--model-store",
                                 str(store), "--workdir", str(workdir), "--config", str(config), *args],
                                cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                                env={**os.environ, **(env or {})})


@pytest.mark.slow
@pytest.mark.torchserve
def test_the_entrypoint_verifies_then_becomes_torchserve(tiny, tmp_path, state):
    from serve.client import Server
    from serve.process import stop_process_group
    store, marker = tmp_path / "store", tmp_path / "handler-ran"
    store.mkdir()
    tampered = rewrite(tiny.mar, store / "mnist.mar", replace={"mnist_handler.py": marker_handler(tiny.mar, marker)})
    config = serve_config(tmp_path / "c.properties")
    refused = foreground(store, tmp_path / "refused", config, "--expect-sha256", sha256_file(tampered))
    assert refused.wait(timeout=120) != 0
    said = (tmp_path / "refused.out").read_text()
    assert "refusing to serve" in said and "mnist_handler.py" in said and "[serve] exec" not in said, said
    assert_torchserve_never_started(tmp_path / "refused")
    assert not marker.exists()

    (store / "mnist.mar").unlink()
    (store / "mnist.mar").write_bytes(tiny.mar.read_bytes())
    workdir = tmp_path / "run"
    process = foreground(store, workdir, config, "--expect-sha256", sha256_file(store / "mnist.mar"))
    try:
        server = Server.from_config(config, workdir)
        server.wait_until_ready(timeout=240, process=process, every_worker=True)
        said = (tmp_path / "run.out").read_text()
        assert "serving the verified read-only copy" in said and "[serve] exec" in said
        assert process.poll() is None  # the verifying process became TorchServe: same pid, still running
        assert state.highest("mnist").sha256 == sha256_file(tiny.mar)
    finally:
        stop_process_group(process)


def test_the_manifest_pins_the_digest_and_mounts_the_key_the_image_trusts():
    import yaml
    deployment = yaml.safe_load((ROOT / "deploy" / "k8s" / "deployment.yaml").read_text())
    pod = deployment["spec"]["template"]["spec"]
    container = pod["containers"][0]
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert len(env["EXPECTED_SHA256"]) == 64
    dockerfile = (ROOT / "deploy" / "Dockerfile").read_text()
    key_path = Path(re.search(r"MNIST_SIGNING_PUBLIC_KEY=(\S+)", dockerfile).group(1))
    mounts = {m["name"]: m for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    secret_mounts = [m for m in mounts.values() if "secret" in volumes[m["name"]]]
    assert [(m["mountPath"], m.get("readOnly")) for m in secret_mounts] == [(str(key_path.parent), True)]
    secret = volumes[secret_mounts[0]["name"]]["secret"]
    assert secret["defaultMode"] & 0o022 == 0  # writable by no one but root: check_public_key accepts it
    assert [item["path"] for item in secret["items"]] == [key_path.name]
    entrypoint = (ROOT / "deploy" / "entrypoint.sh").read_text()
    assert "--expect-sha256 \"$EXPECTED_SHA256\"" in entrypoint and "serve start --foreground" in entrypoint


@pytest.mark.docker
@pytest.mark.slow
def test_the_image_refuses_a_tampered_archive_at_start_and_serves_the_signed_one(tiny, signing_keys):
    """deploy/image-test.sh: builds the image, starts it with a tampered archive mounted, without
    the key, with another signer's key (each must exit non-zero with the reason, TorchServe never
    run), then with the right ones (healthy, serving); the same for the oip mode. Needs dockerd
    (the script starts one as root)."""
    env = {**os.environ, "MAR": str(tiny.mar), "IMG": str(tiny.build_dir / "samples" / "test0000-ankle-boot.png"),
           signing.PUBLIC_KEY_ENV: str(signing_keys.public), "PYTHON": sys.executable}
    result = subprocess.run(["bash", str(ROOT / "deploy" / "image-test.sh")], cwd=ROOT, capture_output=True,
                            text=True, timeout=3600, env=env)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    # five refused TorchServe starts and two refused oip starts, then each mode serving
    assert result.stdout.count("refused (") == 7 and "image-test passed" in result.stdout, result.stdout
    assert result.stdout.count("refused (oip mode") == 2 and "oip mode: answered" in result.stdout, result.stdout
    for line in result.stdout.splitlines():
        if line.startswith(("refused (", "healthy ", "image-test passed")):
            report(f"image: {line}")
