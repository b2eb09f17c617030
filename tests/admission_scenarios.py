"""Admission scenarios under pool pressure (issue #9 B and 6), run in a child process.

`python -m tests.admission_scenarios SPEC_JSON OUT_JSON` starts one engine on the tiny
Llama with a 12-block pool (11 usable, 128 tokens a block; a rank-64 adapter takes 8
blocks, a rank-4 one 1) and its engine core *in this process*
(`VLLM_ENABLE_V1_MULTIPROCESSING=0`), so each `LLMEngine.step()` is exactly one scheduler
step: requests arrive at chosen steps, every run is bounded by a step count (a wrong
admission shows as "not finished", never as a hang) and the scheduler's pool counters
are read directly. An in-process engine core binds the process's threads and caches
vLLM's environment, hence the child process. Results are written as JSON for
tests/test_admission_engine.py, one entry per scenario.
"""

from __future__ import annotations

import json
import os
import sys
import traceback

POOL_BLOCKS = 12  # num_gpu_blocks_override: 11 usable beside vLLM's null block


def _tokens(n, salt=0):
    from vllm.inputs import TokensPrompt

    return TokensPrompt(prompt_token_ids=_ids(n, salt))


def _ids(n, salt=0):
    return [3 + (7 * i + salt) % 250 for i in range(n)]


def _params(max_tokens):
    from vllm import SamplingParams

    return SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)


def _lora(adapter, lora_int_id):
    from vllm.lora.request import LoRARequest

    return LoRARequest(adapter["name"], lora_int_id, adapter["path"])


class Harness:
    def __init__(self, llm):
        self.llm = llm
        self.engine = llm.llm_engine
        self.scheduler = llm.llm_engine.engine_core.engine_core.scheduler

    def run(self, arrivals, max_steps, until=None):
        """Step the engine; `arrivals(step)` returns (id, prompt, params, lora) to add first.

        Returns {request id: {"step", "reason", "stop_reason", "tokens"}}.
        """
        finished = {}
        for step in range(max_steps):
            for request_id, prompt, sampling, lora_request in arrivals(step):
                self.engine.add_request(request_id, prompt, sampling, lora_request=lora_request)
            for out in self.engine.step():
                if out.finished:
                    o = out.outputs[0]
                    finished[out.request_id] = dict(step=step, reason=o.finish_reason,
                                                    stop_reason=str(o.stop_reason), tokens=list(o.token_ids))
            if until is not None and until(finished):
                break
        return finished

    def drain(self):
        """Abort whatever is left, so that one scenario's leftovers never block the next."""
        self.engine.abort_request(list(self.scheduler.requests), internal=True)
        self.run(lambda step: [], 50, until=lambda done: not self.engine.has_unfinished_requests())

    def loads(self):
        return self.scheduler.slora_residency.stats().loads

    def running(self, request_id):
        # The engine core's ids carry a random suffix (InputProcessor.assign_request_id).
        return any(r.request_id.startswith(f"{request_id}-") for r in self.scheduler.running)


def refused_where_it_enters(h, small, big):
    """8 adapter blocks + 4 KV blocks (400 tokens) > 11 usable: refused when added
    (`LLM.generate` and the server add requests the same way)."""
    from vllm.exceptions import VLLMValidationError

    result = {"raised": None}
    try:
        h.engine.add_request("entering", _tokens(400), _params(4), lora_request=_lora(big, 50))
    except VLLMValidationError as e:
        result["raised"], result["message"] = type(e).__name__, str(e)
    else:  # bounded: without the check it would wait forever
        result["finished"] = h.run(lambda step: [], 30, until=lambda done: "entering" in done)
        h.drain()
    fitting = h.run(lambda step: [("fitting", _tokens(200), _params(4), _lora(big, 50))] if step == 0 else [],
                    200, until=lambda done: "fitting" in done)
    result["fitting_tokens"] = len(fitting["fitting"]["tokens"]) if "fitting" in fitting else None
    h.drain()
    return result


def refused_by_the_scheduler(h, small, big):
    """The same request with the frontend check bypassed (stock process_inputs), then
    three small requests behind it once its adapter is read (old code: pinned, KV
    allocation failed, the waiting queue stopped for good)."""
    from vllm_slora.compat import InputProcessor

    stock = InputProcessor.process_inputs._vllm_slora_original
    request = stock(h.engine.input_processor, "never", _tokens(400, salt=1), _params(4),
                    supported_tasks=h.engine.get_supported_tasks(), lora_request=_lora(big, 51))
    h.engine.add_request("never", request, _params(4))
    loads = h.loads()

    def arrivals(step):
        if step == 8:
            return [(f"behind{i}", _tokens(5, salt=i), _params(4), _lora(small[0], 1)) for i in range(3)]
        return []

    finished = h.run(arrivals, 60, until=lambda done: len(done) == 4)
    h.drain()
    return dict(finished=finished, loads=h.loads() - loads)


def fits_later(h, small, big):
    """A long request runs (1 + 2..3 blocks); then a rank-64 request whose adapter (8)
    fits in the free blocks but not beside its prompt's KV (2); then short requests."""
    loads = h.loads()
    added = {}

    def arrivals(step):
        new = []
        if step == 0:
            new.append(("long", _tokens(200, salt=2), _params(100), _lora(small[1], 2)))
        if "big" not in added and h.running("long"):
            added["big"] = step
            new.append(("big", _tokens(200, salt=3), _params(4), _lora(big, 52)))
        elif "big" in added and "short" not in added and step >= added["big"] + 2:
            added["short"] = step
            new += [(f"short{i}", _tokens(5, salt=i), _params(4), _lora(small[2], 3)) for i in range(3)]
        return new

    finished = h.run(arrivals, 250, until=lambda done: {"long", "big", "short0", "short1", "short2"} <= set(done))
    h.drain()
    return dict(finished=finished, loads=h.loads() - loads, added=added)


def stream(h, small, big, max_blocked_steps):
    """A rank-64 request (8 + 1 blocks) behind a never-ending stream of rank-4 requests
    (1 + 1 blocks each, 4 adapters, 10 waiting at all times)."""
    count = {"n": 0}
    big_at = 3

    def arrivals(step):
        new = []
        for _ in range(max(0, 10 - len(h.scheduler.waiting))):
            i = count["n"] = count["n"] + 1
            new.append((f"stream{i}", _tokens(6, salt=i), _params(6), _lora(small[i % 4], 10 + i % 4)))
        if step == big_at:
            new.append(("large", _tokens(20, salt=99), _params(4), _lora(big, 50)))  # read by the first scenario
        return new

    max_steps = big_at + max_blocked_steps + 80
    finished = h.run(arrivals, max_steps, until=lambda done: "large" in done)
    h.drain()
    served = sum(1 for k in finished if k.startswith("stream"))
    return dict(large=finished.get("large"), big_at=big_at, served=served, max_steps=max_steps)


def main(spec_path: str, out_path: str) -> None:
    spec = json.loads(open(spec_path).read())
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    from tests.engines import close_llm, make_llm
    from vllm_slora.pool.admission import MAX_BLOCKED_STEPS

    llm = make_llm(spec["model"], slora={}, max_model_len=512, num_gpu_blocks_override=POOL_BLOCKS,
                   max_num_seqs=8)
    h = Harness(llm)
    results = {"pool_blocks": h.scheduler.kv_cache_manager.block_pool.num_gpu_blocks,
               "max_blocked_steps": MAX_BLOCKED_STEPS}
    small, big = spec["small"], spec["big"]
    scenarios = [("refused_where_it_enters", refused_where_it_enters),
                 ("refused_by_the_scheduler", refused_by_the_scheduler),
                 ("fits_later", fits_later),
                 ("stream", lambda *a: stream(*a, MAX_BLOCKED_STEPS))]
    for name, scenario in scenarios:
        try:
            results[name] = scenario(h, small, big)
        except Exception:  # recorded; the test of that scenario fails with it
            results[name] = {"error": traceback.format_exc()}
            h.drain()
    close_llm(llm)
    with open(out_path, "w") as f:
        json.dump(results, f)


if __name__ == "__main__":
    main(*sys.argv[1:3])
