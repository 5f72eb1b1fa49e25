"""Step-level admission (runtime/step_scheduler.py) and its user inputs: the ``priority`` request field, the
``[stages.denoiser]`` scheduling keys, the ``X-Request-Id`` header and ``GET /v1/requests/{id}``."""

from __future__ import annotations

import time

import httpx
import pytest

from omni_runtime.runtime.config import ConfigError
from omni_runtime.runtime.config_load import config_from_dict
from omni_runtime.runtime.messages import ItemProgress, StepReport
from omni_runtime.runtime.progress import ProgressBook
from omni_runtime.runtime.requests import FIELDS, RequestError, openapi_request_schema, parse_request
from omni_runtime.runtime.step_scheduler import Candidate, StepScheduler, forward_waste


def _c(key="a", pixels=100, priority=0, arrived=0.0) -> Candidate:
    return Candidate(key=key, pixels=pixels, priority=priority, arrived=arrived)


def test_fcfs_within_caps_and_join_key() -> None:
    s = StepScheduler(max_batch_size=3, max_batch_pixels=250)
    waiting = [_c(arrived=2), _c(arrived=1), _c(arrived=3)]
    assert s.admit(waiting, [], now=3) == [1, 0]  # FCFS; the third would pass 250 pixels
    assert s.admit(waiting, [_c(), _c()], now=3) == []  # 200 + 100 > 250
    s = StepScheduler(max_batch_size=3)
    assert s.admit(waiting, [_c(), _c()], now=3) == [1]  # max_batch_size


def test_an_incompatible_head_stops_admission_so_the_set_drains_for_it() -> None:
    s = StepScheduler(max_batch_size=8)
    waiting = [_c("b", arrived=1), _c("a", arrived=2)]
    assert s.admit(waiting, [_c("a")], now=3) == []  # b is next: the running "a" set drains, no newer "a" joins
    assert s.admit(waiting, [], now=3) == [0]  # then b starts the next set (and the later "a" waits for it)
    assert s.admit([_c("a", arrived=1), _c("b", arrived=2)], [_c("a")], now=3) == [0]


def test_priority_first_and_age_prevents_starvation() -> None:
    s = StepScheduler(max_batch_size=1, aging_s=10)
    old_low = _c(priority=-2, arrived=0.0)
    new_high = _c(priority=0, arrived=15.0)
    assert s.admit([old_low, new_high], [], now=15.0) == [1]  # -2 + 1.5 < 0
    newer = _c(priority=0, arrived=25.0)
    assert s.admit([old_low, newer], [], now=25.0) == [0]  # -2 + 2.5 > 0 + 0: age wins over a newer one
    # a flood of newer high-priority requests cannot hold a low one back forever
    now = 0.0
    for now in range(0, 1000, 5):
        if s.admit([old_low, _c(priority=10, arrived=float(now))], [], now=float(now)) == [0]:
            break
    assert now <= 125


def test_scheduler_rejects_bad_settings() -> None:
    with pytest.raises(ValueError, match="aging_s = 0: must be > 0"):
        StepScheduler(max_batch_size=1, aging_s=0)
    with pytest.raises(ValueError, match="max_batch_size = 0"):
        StepScheduler(max_batch_size=0)


@pytest.mark.parametrize(("value", "match"), [
    (11, "priority=11: must be between -10 and 10"), (-11, "priority=-11: must be between -10 and 10"),
    ("high", "priority='high': must be an integer between -10 and 10"), (1.5, "priority=1.5: must be an integer"),
    (True, "priority=True: must be an integer")])
def test_priority_out_of_range_is_a_request_error(value, match) -> None:
    with pytest.raises(RequestError, match=match) as e:
        parse_request({"prompt": "x", "priority": value})
    assert e.value.param == "priority"


def test_priority_field_in_table_schema_and_request() -> None:
    assert FIELDS["priority"].minimum == -10 and FIELDS["priority"].cli_flag == "--priority"
    schema = openapi_request_schema()["properties"]["priority"]
    assert (schema["minimum"], schema["maximum"], schema["default"]) == (-10, 10, 0)
    assert parse_request({"prompt": "x"}).priority == 0
    assert parse_request({"prompt": "x", "priority": 7}).priority == 7


@pytest.mark.parametrize(("key", "value", "match"), [
    ("scheduling", "steps", "stages.denoiser.scheduling = 'steps': allowed values are 'step', 'request'"),
    ("scheduling", 1, "stages.denoiser.scheduling = 1 \\(int\\): must be a string"),
    ("batch_invariant", "yes", "stages.denoiser.batch_invariant = 'yes' \\(str\\): must be true or false"),
    ("priority_aging_s", 0, "stages.denoiser.priority_aging_s = 0.0: must be a number > 0"),
    ("priority_aging_s", -1.5, "stages.denoiser.priority_aging_s = -1.5: must be a number > 0"),
])
def test_bad_scheduling_config_values_name_the_key(key, value, match) -> None:
    with pytest.raises(ConfigError, match=match):
        config_from_dict({"model": {"path": "/m"}, "stages": {"denoiser": {key: value}}})


def test_scheduling_keys_only_on_the_denoiser() -> None:
    with pytest.raises(ConfigError, match="stages.vae.scheduling: unknown key"):
        config_from_dict({"model": {"path": "/m"}, "stages": {"vae": {"scheduling": "step"}}})
    cfg = config_from_dict({"model": {"path": "/m"}, "stages": {"denoiser": {"scheduling": "request",
                                                                              "batch_invariant": True}}})
    assert cfg.stages.denoiser.scheduling == "request" and cfg.stages.denoiser.batch_invariant


def test_progress_book() -> None:
    book = ProgressBook(keep_finished=2)
    book.open("r1", n=2, steps=10)
    assert book.get("r1").as_json()["status"] == "queued"
    book.report(StepReport(stage="denoiser", replica=0, progress=[ItemProgress("r1", 1, 4, 10),
                                                                  ItemProgress("other", 0, 1, 1)]))
    j = book.get("r1").as_json()
    assert (j["status"], j["steps_done"], j["steps_total"]) == ("running", 4, 20)
    assert j["images"][1] == {"index": 1, "steps_done": 4, "steps_total": 10}
    book.denoised("r1", 0)
    book.close("r1", "completed")
    assert book.get("r1").as_json()["steps_done"] == 14 and not book.busy("r1")
    for rid in ("r2", "r3"):
        book.open(rid, 1, 1)
        book.close(rid, "failed")
    assert book.get("r1") is None and book.get("r3").status == "failed"  # only the last 2 finished are kept


def test_request_id_header_and_progress_route_over_http() -> None:
    from http_stub_server import ThreadServer, stub_config

    with ThreadServer(stub_config()) as s:
        body = {"prompt": "p", "seed": 1, "num_inference_steps": 3}
        r = httpx.post(s.url + "/v1/images/generations", json=body, headers={"X-Request-Id": "my-req.1"})
        assert r.status_code == 200 and r.headers["x-request-id"] == "my-req.1"
        j = httpx.get(s.url + "/v1/requests/my-req.1").json()
        assert (j["id"], j["status"], j["steps_total"]) == ("my-req.1", "completed", 3)
        r = httpx.post(s.url + "/v1/images/generations", json=body)
        assert len(r.headers["x-request-id"]) == 32  # one is made when the client sends none
        for bad in ("", "a b", "x" * 65, "a/b"):
            r = httpx.post(s.url + "/v1/images/generations", json=body, headers={"X-Request-Id": bad})
            assert r.status_code == 400, bad
            assert r.json()["error"]["param"] == "X-Request-Id" and "1 to 64 characters" in r.json()["error"]["message"]
        r = httpx.get(s.url + "/v1/requests/nobody")
        assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"
        r = httpx.post(s.url + "/v1/images/generations", json={**body, "priority": 99})
        assert r.status_code == 400 and r.json()["error"]["param"] == "priority"


# ---- mixed image sizes ([stages.denoiser] mixed_sizes, max_padding_waste)


def _m(tokens: int, rows: int = 1, arrived: float = 0.0, key="t8") -> Candidate:
    return Candidate(key=key, pixels=tokens, priority=0, arrived=arrived, tokens=tokens, rows=rows)


def test_mixed_sizes_admit_while_the_padding_waste_fits() -> None:
    s = StepScheduler(max_batch_size=8, max_padding_waste=0.25)
    assert forward_waste([_m(256), _m(221)]) == pytest.approx(35 / 512)
    # 256 + 221 (waste 0.07) join; 100 would make it (156 + 35) / 768 = 0.25 (fits); then 64 breaks the bound
    waiting = [_m(256, arrived=0), _m(221, arrived=1), _m(100, arrived=2), _m(64, arrived=3), _m(256, arrived=4)]
    assert s.admit(waiting, [], now=5) == [0, 1, 2]  # FCFS: the 64 is next, so the walk stops there
    # the rows of a true-CFG request count twice
    assert s.admit([_m(128, rows=2)], [_m(256)], now=0) == []  # 256 / 768 = 0.33
    assert s.admit([_m(128, rows=1)], [_m(256), _m(256)], now=0) == [0]  # 128 / 768 = 0.17
    # another join key (text length) still stops the walk; without the switch sizes are different keys anyway
    assert s.admit([_m(256, key="t16")], [_m(256)], now=0) == []
    assert StepScheduler(max_batch_size=8, max_padding_waste=0.0).admit([_m(221)], [_m(256)], now=0) == []
    assert StepScheduler(max_batch_size=8, max_padding_waste=1.0).admit([_m(1)], [_m(256)], now=0) == [0]
    with pytest.raises(ValueError, match="max_padding_waste = 1.5: must be between 0 and 1"):
        StepScheduler(max_batch_size=8, max_padding_waste=1.5)


@pytest.mark.parametrize(("den", "match"), [
    ({"mixed_sizes": "yes"}, "stages.denoiser.mixed_sizes = 'yes' \\(str\\): must be true or false"),
    ({"mixed_sizes": 1}, "stages.denoiser.mixed_sizes = 1 \\(int\\): must be true or false"),
    ({"max_padding_waste": 1.5}, "stages.denoiser.max_padding_waste = 1.5: must be a number between 0 and 1"),
    ({"max_padding_waste": -0.1}, "stages.denoiser.max_padding_waste = -0.1: must be a number between 0 and 1"),
    ({"max_padding_waste": "x"}, "stages.denoiser.max_padding_waste = 'x' \\(str\\): must be a finite number"),
    ({"mixed_sizes": True, "scheduling": "request"},
     "stages.denoiser.mixed_sizes = true with stages.denoiser.scheduling = 'request'"),
    ({"mixed_sizes": True, "parallel": {"ulysses": 2}},
     "stages.denoiser.mixed_sizes = true with stages.denoiser.parallel.ulysses = 2: not supported"),
    ({"mixed_sizes": True, "parallel": {"ring": 2}},
     "stages.denoiser.mixed_sizes = true with stages.denoiser.parallel.ring = 2: not supported"),
    ({"mixed_sizes": True, "parallel": {"pp": 2}},
     "stages.denoiser.mixed_sizes = true with stages.denoiser.parallel.pp = 2: not supported"),
    ({"mixed_sizes": True, "parallel": {"pp": 2, "pp_mode": "pipefusion"}},
     "stages.denoiser.mixed_sizes = true with stages.denoiser.parallel.pp = 2: not supported"),
])
def test_bad_mixed_sizes_config_values_name_the_key(den, match) -> None:
    with pytest.raises(ConfigError, match=match):
        config_from_dict({"model": {"path": "/m"}, "stages": {"denoiser": den}})


def test_mixed_sizes_config_defaults_and_cfg_parallel() -> None:
    d = config_from_dict({"model": {"path": "/m"}}).stages.denoiser
    assert d.mixed_sizes is False and d.max_padding_waste == 0.25
    d = config_from_dict({"model": {"path": "/m"}, "stages": {"denoiser": {
        "mixed_sizes": True, "max_padding_waste": 0, "parallel": {"cfg": 2}}}}).stages.denoiser
    assert d.mixed_sizes and d.max_padding_waste == 0.0


class _SizeEngine:
    """A step-level engine stub: join key = text length only (mixed sizes), 16 x 16 pixels per image token."""

    def __init__(self) -> None:
        self.asked = 0

    def join_key(self, item):
        return ("t8",)

    def row_tokens(self, item):
        self.asked += 1
        p = item.params
        return p.width * p.height // 256, 2 if p.true_cfg_scale > 1 else 1

    def run_step(self):  # marks it a step-level engine
        return {}


def test_the_executor_gives_the_policy_each_items_tokens_and_rows_with_mixed_sizes() -> None:
    from omni_runtime.runtime.messages import Work
    from omni_runtime.runtime.stage_exec import StageExecutor

    def offer(ex, size, **kw):
        ex.offer(Work(req_id=size, index=0, seed=0, params=parse_request({"prompt": "x", "size": size, **kw})))

    ex = StageExecutor(_SizeEngine(), "denoiser", 0, max_batch_size=8, batch_timeout_ms=0, scheduling="step",
                       max_padding_waste=0.1)
    for size in ("256x256", "272x208", "128x128"):
        offer(ex, size)
    cands = [p.candidate() for p in ex.pending]
    assert [(c.tokens, c.rows) for c in cands] == [(256, 1), (221, 1), (64, 1)]
    assert ex.scheduler.admit(cands, [], now=time.time()) == [0, 1]  # 64 tokens would waste 0.3 > 0.1
    # without the switch the engine is not asked (its join key keeps sizes apart)
    engine = _SizeEngine()
    ex = StageExecutor(engine, "denoiser", 0, max_batch_size=8, batch_timeout_ms=0, scheduling="step")
    offer(ex, "256x256")
    assert engine.asked == 0 and ex.scheduler.max_padding_waste is None
