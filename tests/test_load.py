"""A short run of benchmarks/load.py: the real uvicorn server on loopback, with a queue so small that some requests
are refused (503 ``server_busy``); nothing else may fail."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from benchmarks import load  # noqa: E402
from detector import build_model  # noqa: E402
from detector.checkpoint import save_weights  # noqa: E402


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """The server started here does not see the developer's RNNPOOL_* variables (an API key would fail it)."""
    import os

    for name in list(os.environ):
        if name.startswith("RNNPOOL_"):
            monkeypatch.delenv(name)


def test_load_result_statistics() -> None:
    r = load.LoadResult(clients=4, elapsed_s=2.0, latencies_ms=[float(i) for i in range(1, 101)], busy=3)
    r.errors["ReadTimeout"] += 1
    assert r.ok == 100 and r.requests_per_s == 50.0 and r.error_count == 1
    assert r.percentile_ms(0.5) in (50.0, 51.0) and r.percentile_ms(0.99) == 99.0
    assert r.row() == "| 4 | 104 | 50.0 | 51.0 | 99.0 | 3 | ReadTimeout: 1 |"
    assert math.isnan(load.LoadResult(clients=1).percentile_ms(0.5))
    with pytest.raises(SystemExit):
        load.main(["--duration", "0"])


@pytest.mark.slow
def test_short_load_run_has_no_errors_but_deliberate_503s(tmp_path: Path) -> None:
    torch.manual_seed(0)
    weights = tmp_path / "random_m4.pt"
    save_weights(weights, build_model("rnnpool_face_m4"))
    # 8 clients against 1 worker + 2 queue places: 5 of them always find the server full.
    results, note = load.run(str(weights), clients=(1, 8), duration_s=2.0, max_concurrency=1, max_queue=2,
                             warmup_requests=2, log=False)
    assert "random_m4.pt" in note
    single, crowd = results
    for r in results:
        assert r.error_count == 0, r.errors
        assert r.ok > 0 and set(r.statuses) <= {200, 503}, r.statuses
        assert 1.5 < r.elapsed_s < 2.0 + 60.0  # bounded by the duration (plus requests in flight)
    assert single.busy == 0 and single.statuses[503] == 0
    assert crowd.busy > 0 and crowd.busy == crowd.statuses[503]
