"""bench/peers.py: the peers make bench measures TorchServe against."""

import pytest

from bench.peers import PEERS_PYTHON, Peer, PeerProcess, bench_peers, best_peer, default_peers


def test_default_peers_cover_litserve_at_one_worker_and_per_core_and_bentoml():
    names = [p.name for p in default_peers(cores=4)]
    assert names == ["LitServe, batching on (16, 5 ms), 1 worker", "LitServe, batching on (16, 5 ms), 4 workers",
                     "LitServe, batching off, 4 workers", "BentoML, adaptive batching (up to 16), 4 workers",
                     "BentoML, batching off, 4 workers"]


def test_a_missing_peers_venv_says_how_to_make_it(tmp_path):
    process = PeerProcess(Peer("LitServe", 1, 1), tmp_path, tmp_path, python=tmp_path / "no" / "python")
    with pytest.raises(RuntimeError, match="make peers-venv"):
        process.start()


def test_best_peer_ignores_peers_that_failed_or_answered_errors():
    rows = {"a": {"requests_per_second": 900.0, "non_2xx": 3}, "b": {"error": "did not start"},
            "c": {"requests_per_second": 500.0, "non_2xx": 0}}
    assert best_peer(rows) == ("c", rows["c"])
    assert best_peer({"b": {"error": "x"}}) is None


@pytest.mark.slow
@pytest.mark.skipif(not PEERS_PYTHON.exists(), reason="no .venv-peers: `make peers-venv` builds it (make bench does)")
def test_litserve_serves_the_same_answers_as_onnxruntime(artifacts, tmp_path):
    png = sorted((artifacts.build_dir / "samples").glob("*.png"))[0]
    rows = bench_peers(artifacts.build_dir, tmp_path, png, concurrency=4, seconds=1,
                       peers=[Peer("LitServe", 1, 16)], log=lambda message: None)
    row = rows["LitServe, batching on (16, 5 ms), 1 worker"]
    assert "error" not in row, row.get("error")
    assert row["max_abs_dp"] <= 1e-5 and row["requests"] > 0 and row["non_2xx"] == 0
