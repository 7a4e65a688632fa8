"""Offline Engine: the scheduler and model runner in this process, for Python users, tests and
benchmarks. `Engine(model_path=...).generate(prompts, sampling_params)`.

Results follow SGLang's `/generate` shape: {"text", "output_ids", "meta_info"}, with logprobs as
`(logprob, token_id, text_or_None)` tuples.
"""

from __future__ import annotations

import logging
import os
import uuid
from typing import Any

from transformers import AutoTokenizer

from sglora.config import ConfigError, ServerArgs
from sglora.distributed.parallel_state import destroy_distributed, init_distributed
from sglora.messages import ReqOutput, SamplingParams, TokenizedGenerateReq
from sglora.model_executor.model_config import ModelConfig, resolve_model_dir
from sglora.model_executor.model_runner import ModelRunner, resolve_device
from sglora.scheduler.scheduler import Scheduler
from sglora.stop_strings import final_text
from sglora.testing.demo import apply_demo

logger = logging.getLogger(__name__)


def load_tokenizer(path: str) -> Any:
    return AutoTokenizer.from_pretrained(resolve_model_dir(path), trust_remote_code=False)


class Engine:
    def __init__(self, args: ServerArgs | None = None, **kwargs: Any):
        self.args = apply_demo(args or ServerArgs(**kwargs))
        self.device = resolve_device(self.args.device, self._join_tp_group())
        self.model_config = ModelConfig.load(
            self.args.model_path, self.args.dtype, self.device.type, self.args.context_length
        )
        self.tokenizer = load_tokenizer(self.args.tokenizer_path or self.args.model_path)
        self.runner = ModelRunner(self.args, self.model_config, self.device)
        self.scheduler = Scheduler(self.args, self.runner, self.tokenizer)

    def _join_tp_group(self) -> int:
        """With --tp-size N the offline engine runs SPMD: N copies of the same program, started
        by torchrun, each calling generate() with the same inputs. Returns the local rank."""
        n = self.args.tp_size
        if n == 1:
            return 0
        if int(os.environ.get("WORLD_SIZE", 1)) != n:
            raise ConfigError(
                f"--tp-size {n}: the offline Engine needs {n} processes started by torchrun "
                f"(torchrun --nproc-per-node {n} your_script.py); or use the server"
            )
        rank, local = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"])
        device = resolve_device(self.args.device, local)
        one_node = int(os.environ.get("LOCAL_WORLD_SIZE", n)) == n
        init_distributed(
            rank,
            n,
            "env://",
            device,
            self.args.dist_timeout,
            custom_all_reduce=one_node and not self.args.disable_custom_all_reduce,
        )
        return local

    def generate(
        self,
        prompt: str | list[str] | None = None,
        sampling_params: dict | SamplingParams | list | None = None,
        input_ids: list[int] | list[list[int]] | None = None,
        return_logprob: bool = False,
        logprob_start_len: int = -1,
        top_logprobs_num: int = 0,
        lora_path: str | list[str | None] | None = None,
    ) -> dict | list[dict]:
        """Generate for one prompt (returns a dict) or a list (returns a list, same order).

        `lora_path`: the adapter name (as loaded) for every prompt, or a list aligned with
        the prompts (None: the base model)."""
        single = isinstance(prompt, str) or (
            input_ids is not None and input_ids and isinstance(input_ids[0], int)
        )
        if prompt is not None:
            prompts = [prompt] if isinstance(prompt, str) else list(prompt)
            ids = [self.tokenizer.encode(p) for p in prompts]
        elif input_ids is not None:
            ids = [input_ids] if single else [list(x) for x in input_ids]
        else:
            raise ValueError("generate() needs a prompt or input_ids")
        params = (
            sampling_params if isinstance(sampling_params, list) else [sampling_params] * len(ids)
        )
        if len(params) != len(ids):
            raise ValueError(f"{len(params)} sampling_params for {len(ids)} prompts")
        loras = lora_path if isinstance(lora_path, list) else [lora_path] * len(ids)
        if len(loras) != len(ids):
            raise ValueError(f"{len(loras)} lora_path entries for {len(ids)} prompts")
        reqs = []
        for tokens, p, lora in zip(ids, params, loras):
            sp = p if isinstance(p, SamplingParams) else SamplingParams(**(p or {}))
            sp.verify(self.model_config.vocab_size)
            reqs.append(
                TokenizedGenerateReq(
                    rid=uuid.uuid4().hex,
                    input_ids=tokens,
                    sampling_params=sp,
                    return_logprob=return_logprob,
                    logprob_start_len=logprob_start_len,
                    top_logprobs_num=top_logprobs_num,
                    lora_name=lora,
                )
            )
        results = self._run_to_completion(reqs)
        return results[0] if single else results

    def _run_to_completion(self, reqs: list[TokenizedGenerateReq]) -> list[dict]:
        acc: dict[str, _Accumulator] = {r.rid: _Accumulator(r) for r in reqs}
        for r in reqs:
            self.scheduler.add_request(r)
        pending = set(acc)
        while pending:
            for out in self.scheduler.step():
                if out.rid in acc:
                    acc[out.rid].add(out)
                    if out.finished:
                        pending.discard(out.rid)
        return [acc[r.rid].result(self.tokenizer) for r in reqs]

    def load_lora_adapter(self, lora_name: str, lora_path: str, pinned: bool = False) -> None:
        self.scheduler.load_adapter(lora_name, lora_path, pinned)

    def unload_lora_adapter(self, lora_name: str) -> None:
        self.scheduler.request_unload(lora_name)
        while lora_name in self.scheduler.pending_unloads:
            self.scheduler.step()

    def shutdown(self) -> None:
        """Leave the TP group (an SPMD program's last engine calls this)."""
        if self.args.tp_size > 1:
            destroy_distributed()

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.shutdown()


class _Accumulator:
    """Collects a request's incremental ReqOutputs into the final result."""

    def __init__(self, req: TokenizedGenerateReq):
        self.req = req
        self.output_ids: list[int] = []
        self.logprobs: list[float] = []
        self.top: list[list[tuple[int, float]]] = []
        self.last: ReqOutput | None = None
        self.input_lp: list[tuple[int, float | None]] | None = None
        self.input_top: list | None = None

    def add(self, out: ReqOutput) -> None:
        self.output_ids += out.new_token_ids
        self.logprobs += out.new_token_logprobs or []
        self.top += out.new_top_logprobs or []
        if out.input_token_logprobs is not None:
            self.input_lp, self.input_top = out.input_token_logprobs, out.input_top_logprobs
        self.last = out

    def result(self, tokenizer: Any) -> dict:
        last = self.last
        reason = last.finish_reason or {}
        sp = self.req.sampling_params
        text = final_text(
            tokenizer, self.output_ids, reason, sp.skip_special_tokens, sp.min_new_tokens
        )
        meta: dict[str, Any] = {
            "id": self.req.rid,
            "prompt_tokens": last.prompt_tokens,
            "completion_tokens": last.completion_tokens,
            "cached_tokens": last.cached_tokens,
            "finish_reason": reason,
        }
        if self.req.return_logprob:
            meta["output_token_logprobs"] = [
                (lp, t, None) for lp, t in zip(self.logprobs, self.output_ids)
            ]
            meta["input_token_logprobs"] = [(lp, t, None) for t, lp in (self.input_lp or [])]
            if self.req.top_logprobs_num:
                meta["output_top_logprobs"] = [[(lp, t, None) for t, lp in row] for row in self.top]
                meta["input_top_logprobs"] = [
                    None if row is None else [(lp, t, None) for t, lp in row]
                    for row in (self.input_top or [])
                ]
        return {"text": text, "output_ids": self.output_ids, "meta_info": meta}
