"""The scheduler process loop (in this process, over real ZMQ sockets): a generation request the
scheduler fails to take gets a finished output carrying an error id, and the requests around it
are served as if nothing happened."""

from __future__ import annotations

import threading

import zmq

from sglora.config import ServerArgs
from sglora.messages import BatchReqOutput, PortArgs, SamplingParams, ShutdownReq
from sglora.messages import TokenizedGenerateReq as Gen
from sglora.scheduler.process import SchedulerLoop
from sglora.testing.tiny import tiny_model_path


def test_a_request_that_fails_in_the_scheduler_fails_alone(tmp_path, monkeypatch):
    ports = PortArgs(f"ipc://{tmp_path}/sched", f"ipc://{tmp_path}/tok")
    ctx = zmq.Context()
    outputs = ctx.socket(zmq.PULL)
    outputs.bind(ports.tokenizer_input)
    loop = SchedulerLoop(
        ServerArgs(model_path=str(tiny_model_path("qwen3_moe")), device="cpu"), ports
    )
    add = loop.scheduler.add_request

    def add_or_fail(req):
        if req.rid == "bad":
            raise RuntimeError("boom")
        add(req)

    monkeypatch.setattr(loop.scheduler, "add_request", add_or_fail)
    inputs = ctx.socket(zmq.PUSH)
    inputs.connect(ports.scheduler_input)
    thread = threading.Thread(target=loop.run)
    thread.start()
    try:
        sp = SamplingParams(max_new_tokens=4, temperature=0.0, ignore_eos=True)
        for rid in ("before", "bad", "after"):
            inputs.send_pyobj(Gen(rid, [5, 6, 7, 8], sp))
        finished = {}
        outputs.setsockopt(zmq.RCVTIMEO, 60_000)
        while len(finished) < 3:
            msg = outputs.recv_pyobj()
            assert isinstance(msg, BatchReqOutput)
            for out in msg.outputs:
                if out.finished:
                    finished.setdefault(out.rid, out)
    finally:
        inputs.send_pyobj(ShutdownReq())
        thread.join(60)
        inputs.close(0)
        outputs.close(0)
        ctx.term()
    assert not thread.is_alive()
    bad = finished["bad"].finish_reason
    assert bad["type"] == "abort" and len(bad["error_id"]) == 16
    assert bad["error_id"] in bad["message"]
    for rid in ("before", "after"):
        assert finished[rid].finish_reason["type"] == "length"
        assert finished[rid].completion_tokens == 4
