"""CPU matmul plans are measured once per machine and kept on disk: a second load times nothing."""
import json
import logging
from types import SimpleNamespace

import pytest
import torch

from chroma_agent.model import matmul
from chroma_agent.model.matmul import Projection, plan_cache_file


@pytest.fixture
def fresh_plans(tmp_path, monkeypatch):
    """An empty plan cache folder and no plans known to this process; `_measure` counted
    (and instant: it picks the last candidate, so that stored plans are not all F.linear)."""
    monkeypatch.setenv("CHROMA_AGENT_CACHE_DIR", str(tmp_path))
    monkeypatch.delenv("CHROMA_AGENT_MATMUL", raising=False)
    monkeypatch.setattr(matmul, "_PLANS", {})
    monkeypatch.setattr(matmul, "_STORED", {})
    calls = []

    def measure(weight, bias, rows, paths):
        calls.append((tuple(weight.shape), rows))
        return paths[-1]

    monkeypatch.setattr(matmul, "_measure", measure)
    return calls


def forget_in_process(monkeypatch):
    """What a new process knows: only the file."""
    monkeypatch.setattr(matmul, "_PLANS", {})
    monkeypatch.setattr(matmul, "_STORED", {})


def test_a_second_load_reuses_the_stored_plans(tiny_checkpoint, fresh_plans, monkeypatch, caplog):
    from chroma_agent import ChromaModel

    first = ChromaModel.from_pretrained(tiny_checkpoint, device="cpu")
    assert fresh_plans and plan_cache_file().is_file()
    measured = len(fresh_plans)
    forget_in_process(monkeypatch)
    with caplog.at_level(logging.INFO, logger="chroma_agent"):
        second = ChromaModel.from_pretrained(tiny_checkpoint, device="cpu")
    assert len(fresh_plans) == measured  # nothing timed again
    chosen = lambda m: [(p.one_row, p.few_rows) for p in m._projections()]  # noqa: E731
    assert chosen(second) == chosen(first) and any(path not in ("linear", None) for pair in chosen(first) for path in pair)
    # loading says what it spends its time on
    logged = caplog.text
    for step in ("found the checkpoint files", "read the config and the tokenizer", "built the model's parts",
                 "read the weights onto cpu", "CPU matmul plans in", "0 measured now"):
        assert step in logged


def test_the_cache_is_keyed_by_machine_and_shape(fresh_plans, monkeypatch):
    weight = torch.randn(64, 48)
    Projection(weight).plan(1)
    assert fresh_plans == [((64, 48), 1)]
    plans = json.loads(plan_cache_file().read_text())["plans"]
    (key,) = plans
    assert key.startswith(matmul._machine()) and "64x48 float32 no-bias 1 row" in key
    assert f"torch {torch.__version__}" in key and f"{torch.get_num_threads()} threads" in key
    forget_in_process(monkeypatch)
    Projection(torch.randn(64, 48)).plan(1)
    assert len(fresh_plans) == 1                          # same machine and shape: read back
    Projection(torch.randn(64, 40)).plan(1)
    assert len(fresh_plans) == 2                          # another shape: measured
    forget_in_process(monkeypatch)
    monkeypatch.setattr(matmul, "_machine", lambda: "Another CPU | torch 0.0")
    Projection(torch.randn(64, 48)).plan(1)
    assert len(fresh_plans) == 3                          # another machine: measured
    assert len(json.loads(plan_cache_file().read_text())["plans"]) == 3  # all kept, atomically rewritten
    assert not list(plan_cache_file().parent.glob("*.tmp"))


def test_a_corrupted_cache_is_ignored_with_a_warning(fresh_plans, caplog):
    plan_cache_file().parent.mkdir(parents=True, exist_ok=True)
    plan_cache_file().write_text('{"plans": {"half a')
    with caplog.at_level(logging.WARNING, logger="chroma_agent"):
        assert Projection(torch.randn(32, 16)).plan(1) == "split"
    assert "ignoring the matmul plan cache" in caplog.text and len(fresh_plans) == 1
    assert len(json.loads(plan_cache_file().read_text())["plans"]) == 1  # rewritten whole


def test_a_stored_path_this_build_cannot_run_is_measured_again(fresh_plans, monkeypatch):
    Projection(torch.randn(32, 16)).plan(1)
    file = plan_cache_file()
    data = json.loads(file.read_text())
    data["plans"] = {k: "warp_drive" for k in data["plans"]}
    file.write_text(json.dumps(data))
    forget_in_process(monkeypatch)
    assert Projection(torch.randn(32, 16)).plan(1) == "split" and len(fresh_plans) == 2


def test_plan_cache_location(monkeypatch, tmp_path):
    monkeypatch.delenv("CHROMA_AGENT_CACHE_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert plan_cache_file() == tmp_path / "xdg" / "chroma-agent" / "matmul-plans.json"
    monkeypatch.setenv("CHROMA_AGENT_CACHE_DIR", str(tmp_path / "mine"))
    assert plan_cache_file() == tmp_path / "mine" / "matmul-plans.json"


def test_measuring_takes_the_best_median_so_one_slow_call_cannot_decide(monkeypatch):
    """A path whose calls are delayed once in a while (another process got the core) still
    wins when its typical call is faster."""
    ticks = iter(range(10**6))
    clock = {"now": 0.0}
    monkeypatch.setattr(matmul, "time", SimpleNamespace(perf_counter=lambda: clock["now"]))
    real_call = Projection.__call__

    def call(self, x):
        n = next(ticks)
        # "split" takes 1 unit, linear 2; one split call in every sweep stalls for 100
        clock["now"] += (100.0 if n % 7 == 0 else 1.0) if self.one_row == "split" else 2.0
        return real_call(self, x)

    monkeypatch.setattr(Projection, "__call__", call)
    monkeypatch.setattr(matmul, "_PLAN_BYTES", 64 * 48 * 4 * 6)   # 6 copies per sweep
    assert matmul._measure(torch.randn(64, 48), None, 1, ["linear", "split"]) == "split"
