"""Scheduler: continuous batching over the paged KV cache (between the api server / engine and
the model runner).

Each `step()` runs one batch: a prefill (new requests and one chunked request, under a token
budget) when anything waits and fits, else a decode step over every running request. KV that
runs out during decode is recovered by retracting requests back to the waiting queue; their
computed KV goes to the prefix cache, so resuming them is cheap and gives the same tokens.

Overlap scheduling (default; `--disable-overlap-schedule` turns it off): a step launches its
batch, then processes the batch the previous step launched, so the host reads step n's tokens
and builds step n+1 while the device computes. A request that step n finishes by a stop token
or string is found a step late: its token from step n+1 is dropped and that step's KV slot
freed. A request that a length limit ends is known to end at launch and is not decoded again.
"""

from __future__ import annotations

import logging
import math
from typing import Any

import torch

from sglora.config import ServerArgs
from sglora.lora.adapter import AdapterError
from sglora.messages import ReqOutput, TokenizedGenerateReq
from sglora.model_executor.forward_batch import ForwardMode
from sglora.model_executor.model_runner import ModelRunner
from sglora.model_executor.sampler import SamplingBatchInfo
from sglora.model_executor.step_output import StepResult
from sglora.scheduler.batch import ScheduleBatch
from sglora.scheduler.kv_manager import KVManager
from sglora.scheduler.policy import order_waiting
from sglora.scheduler.request import Req, ReqState
from sglora.stop_strings import find_stop

logger = logging.getLogger(__name__)

# Share of each running request's remaining max_new_tokens kept free for its decode steps.
INIT_NEW_TOKEN_RATIO, MIN_NEW_TOKEN_RATIO, NEW_TOKEN_RATIO_DECAY = 0.7, 0.1, 0.001
# After a request has waited this many prefill rounds for an adapter slot, nothing queued
# behind it is admitted, so the running batch drains and its adapter gets a slot.
LORA_STARVATION_ROUNDS = 16


class Scheduler:
    def __init__(self, args: ServerArgs, runner: ModelRunner, tokenizer: Any):
        self.args, self.runner, self.tokenizer = args, runner, tokenizer
        self.kv = KVManager(runner.req_to_token_pool, runner.allocator, runner.radix_cache)
        self.context_len = runner.model_config.context_len
        self.eos_ids = frozenset(runner.model_config.eos_token_ids) | (
            frozenset([tokenizer.eos_token_id])
            if getattr(tokenizer, "eos_token_id", None) is not None
            else frozenset()
        )
        self.waiting: list[Req] = []
        self.running: list[Req] = []  # decoding
        self.chunked: Req | None = None  # partly prefilled, owns KV, not yet decoding
        self.new_token_ratio = INIT_NEW_TOKEN_RATIO
        self.num_retractions = 0
        self._outputs: list[ReqOutput] = []
        self.lora = runner.lora_manager  # None without --enable-lora
        self.pending_unloads: list[str] = []
        self.overlap = not args.disable_overlap_schedule
        self.in_flight: ScheduleBatch | None = None  # launched, results not processed yet

    # ---- requests in and out -------------------------------------------------------------

    def add_request(self, msg: TokenizedGenerateReq) -> None:
        req = Req.from_message(msg)
        error = self._validate(req)
        if error:
            req.finish({"type": "abort", "message": error})
            self._outputs.append(req.take_output())
            return
        self.waiting.append(req)

    def _validate(self, req: Req) -> str | None:
        n, max_new = req.prompt_len, req.sampling_params.max_new_tokens
        if req.lora_name is not None:
            if self.lora is None:
                return "this server was started without --enable-lora"
            if (
                req.lora_name not in self.lora.registry.refs
                or req.lora_name in self.pending_unloads
            ):
                return f"the LoRA adapter {req.lora_name!r} is not loaded"
        if n == 0:
            return "the prompt is empty"
        if n >= self.context_len:
            return f"the prompt has {n} tokens; the context length is {self.context_len}"
        capacity = self.kv.allocator.size
        if n + max_new > capacity:
            return (
                f"the prompt ({n} tokens) plus max_new_tokens ({max_new}) exceeds the KV "
                f"cache capacity ({capacity} tokens)"
            )
        return None

    def abort_request(self, rid: str) -> bool:
        for req in [*self.waiting, *self.running, *([self.chunked] if self.chunked else [])]:
            if req.rid == rid:
                self._abort(req, "aborted by the client")
                return True
        return False

    def _abort(self, req: Req, message: str) -> None:
        if req in self.waiting:
            self.waiting.remove(req)
        if req in self.running:
            self.running.remove(req)
        if req is self.chunked:
            self.chunked = None
        self.kv.release(req)
        req.finish({"type": "abort", "message": message})
        self._outputs.append(req.take_output())

    def has_work(self) -> bool:
        return bool(
            self.waiting
            or self.running
            or self.chunked
            or self.in_flight is not None
            or self._outputs
            or self.pending_unloads
        )

    # ---- adapters ----------------------------------------------------------------------------

    def load_adapter(self, name: str, path: str, pinned: bool = False) -> None:
        """Raises AdapterError (nothing changed) when the adapter cannot be served."""
        if self.lora is None:
            raise ValueError("this server was started without --enable-lora")
        busy = self._adapters_in_use([])
        if pinned and not self.lora.fits_batch(busy | {name}):
            # the running batch keeps its adapters' slots: a new pin must not take one of them
            raise AdapterError(
                f"cannot pin {name!r} now: running requests use the adapters {sorted(busy)}, "
                f"and with the pinned ones they leave no slot free; retry when fewer run"
            )
        self.lora.load_adapter(name, path, pinned)

    def request_unload(self, name: str) -> None:
        """New requests for `name` are refused now; it leaves once its requests finish."""
        if self.lora is None or name not in self.lora.registry.refs:
            raise ValueError(f"no LoRA adapter named {name!r} is loaded")
        if name not in self.pending_unloads:
            self.pending_unloads.append(name)
        self._finish_unloads()

    def _finish_unloads(self) -> list[str]:
        # a launched batch still reads its adapters' slots, finished requests' rows included
        in_flight = self.in_flight.reqs if self.in_flight is not None else []
        busy = {
            r.lora_name
            for r in [
                *self.waiting,
                *self.running,
                *([self.chunked] if self.chunked else []),
                *in_flight,
            ]
        }
        done = [n for n in self.pending_unloads if n not in busy]
        for name in done:
            self.pending_unloads.remove(name)
            self.lora.unload_adapter(name)
            self.kv.evict_namespace(name)
        return done

    def _adapters_in_use(self, picked: list[Req]) -> set[str]:
        reqs = [*self.running, *picked, *([self.chunked] if self.chunked else [])]
        return {r.lora_name for r in reqs if r.lora_name is not None}

    # ---- one step ------------------------------------------------------------------------

    def step(self) -> list[ReqOutput]:
        """Launch at most one batch, process the one launched before it (with overlap) or this
        one (without); return every request's new output since the last step."""
        batch = self._prefill_batch() or self._decode_batch()
        if batch is not None:
            self._launch(batch)
        # Step n's results are read only now, after step n+1 is queued behind it on the device.
        done, self.in_flight = self.in_flight, batch
        if done is not None:
            self._process(done)
        if self.overlap:
            self._release_length_ended()
        else:
            self.sync()
        if self.pending_unloads:
            self._finish_unloads()
        outputs, self._outputs = self._outputs, []
        return outputs

    def set_overlap(self, on: bool) -> None:
        """Turn overlap scheduling on or off between steps (a benchmark compares both on one
        engine); first processes the batch in flight."""
        self.sync()
        self.overlap = on

    def sync(self) -> None:
        """Process the batch in flight, if any (waits for the device); its outputs come with
        the next step's."""
        done, self.in_flight = self.in_flight, None
        if done is not None:
            self._process(done)

    def _release_length_ended(self) -> None:
        """A request that a length limit ends needs no KV for its last token, in flight now.
        Once the host has read all its other tokens, its KV goes to the prefix cache, before
        the next batch is built, as it does without overlap: both modes then see the same free
        KV and take the same decisions."""
        if self.in_flight is None:
            return
        for req, samples in zip(self.in_flight.reqs, self.in_flight.samples):
            if (
                samples
                and req.tokens_in_flight == 1
                and req.req_pool_idx is not None
                and not req.finished
                and req.ends_by_length(self.context_len)
            ):
                self.kv.cache_and_release(req)

    def _decode_reserve(self, extra: list[Req]) -> int:
        remaining = sum(
            max(r.sampling_params.max_new_tokens - r.output_len, 0) for r in [*self.running, *extra]
        )
        return int(remaining * self.new_token_ratio)

    def _prefill_batch(self) -> ScheduleBatch | None:
        budget = self.args.max_prefill_tokens
        chunk = self.args.chunked_prefill_size
        if chunk > 0:
            budget = min(budget, chunk)
        candidates = [self.chunked] if self.chunked else []
        ordered = order_waiting(self.waiting, self.args.schedule_policy, self.kv.match_prefix)
        # requests starved of an adapter slot go first, and block everything behind them
        candidates += sorted(ordered, key=lambda r: r.lora_wait_rounds <= LORA_STARVATION_ROUNDS)
        picked: list[Req] = []
        slots: list[torch.Tensor] = []
        starts: list[int] = []
        for req in candidates:
            if req is not self.chunked:
                if len(self.running) + len(picked) >= self.args.max_running_requests:
                    break
                if not self._adapter_fits(req, picked):
                    if req.lora_wait_rounds > LORA_STARVATION_ROUNDS:
                        break
                    continue
                need = req.fill_len - self.kv.match_prefix(req)
                idle = not self.running and not picked and self.chunked is None
                # A new request needs room for its prompt and a share of everyone's decoding;
                # when nothing else runs it needs only room for its next chunk.
                want = min(need, budget) if idle else need + self._decode_reserve(picked)
                if self.kv.available_tokens() < want or not self.kv.admit(req):
                    break
                self.waiting.remove(req)
                req.state = ReqState.RUNNING
                if not req.admitted_once:
                    req.cached_tokens, req.admitted_once = req.prefix_len, True
            n = min(req.fill_len - req.kv_len, budget)
            got = self.kv.alloc_tokens(n) if n > 0 else None
            if got is None:  # cannot happen after the availability check, but never lose a req
                if req is not self.chunked and req.kv_len == req.prefix_len:
                    self._requeue(req)
                break
            starts.append(req.kv_len)
            self.kv.extend(req, got)
            picked.append(req)
            slots.append(got)
            budget -= n
            self.chunked = req if req.kv_len < req.fill_len else None
            if budget <= 0 or self.chunked is not None:
                break
        if not picked:
            return None
        ends = [r.kv_len for r in picked]
        return ScheduleBatch(ForwardMode.EXTEND, picked, torch.cat(slots), starts, ends)

    def _adapter_fits(self, req: Req, picked: list[Req]) -> bool:
        if req.lora_name is None:
            return True
        names = self._adapters_in_use(picked)
        if req.lora_name in names or self.lora.fits_batch(names | {req.lora_name}):
            return True
        req.lora_wait_rounds += 1
        return False

    def _decode_batch(self) -> ScheduleBatch | None:
        while self.running:
            slots = self.kv.alloc_tokens(len(self.running))
            if slots is not None:
                break
            self._retract_one()
        else:
            return None
        starts = [r.kv_len for r in self.running]
        self.kv.extend_decode(self.running, slots)
        self.new_token_ratio = max(
            MIN_NEW_TOKEN_RATIO, self.new_token_ratio - NEW_TOKEN_RATIO_DECAY
        )
        ends = [s + 1 for s in starts]
        return ScheduleBatch(ForwardMode.DECODE, list(self.running), slots, starts, ends)

    def _retract_one(self) -> None:
        """Move the running request that loses least (fewest outputs, longest prompt) back to
        the front of the waiting queue; its KV goes to the prefix cache."""
        victim = min(self.running, key=lambda r: (r.output_len, -r.prompt_len))
        self.running.remove(victim)
        self.kv.cache_and_release(victim)
        self._requeue(victim)
        self.num_retractions += 1
        self.new_token_ratio = min(1.0, self.new_token_ratio + 0.1)
        logger.info("KV cache full: retracted %s (%d running)", victim.rid, len(self.running))

    def _requeue(self, req: Req) -> None:
        self.kv.release(req)
        req.state = ReqState.WAITING
        self.waiting.insert(0, req)

    # ---- run and process ---------------------------------------------------------------

    def _launch(self, batch: ScheduleBatch) -> None:
        """Queue the batch on the device and do the bookkeeping that does not depend on its
        tokens. Nothing here waits for the device."""
        reqs = batch.reqs
        fb = batch.to_forward_batch(self.runner.device, self.runner.last_token_ids)
        info = SamplingBatchInfo.from_requests(
            [r.sampling_params for r in reqs],
            [r.origin_input_ids for r in reqs],
            [r.output_ids for r in reqs],
            self.runner.model_config.vocab_size,
            self.runner.device,
            # decode rows whose input token (their last output) the host has not read yet
            [i for i, r in enumerate(reqs) if r.tokens_in_flight],
            fb.input_ids,
            self.eos_ids,
            need_logprobs=any(r.return_logprob for r in reqs),
        )
        top_n = max((r.top_logprobs_num for r in reqs), default=0)
        batch.output = self.runner.forward_and_sample(fb, info, top_n)
        for req, samples in zip(reqs, batch.samples):
            req.tokens_in_flight += samples
        # A request whose length limit this token reaches leaves the running set now: no
        # decode step is spent on it (it is finished when its token is read).
        ctx = self.context_len
        if batch.mode is ForwardMode.EXTEND:
            self.running += [
                r for r, s in zip(reqs, batch.samples) if s and not r.ends_by_length(ctx)
            ]
        else:
            self.running = [r for r in self.running if not r.ends_by_length(ctx)]

    def _process(self, batch: ScheduleBatch) -> None:
        """Read a launched batch's tokens (waits for the device to finish it) and apply them:
        stop checks, KV release, outputs."""
        out = batch.output.wait()
        self._collect_input_logprobs(batch, out)
        for i, (req, samples) in enumerate(zip(batch.reqs, batch.samples)):
            # skipped: a prefill chunk; a request aborted meanwhile, or one that a stop ended
            # a step earlier (this is the extra token of its overlapped step: dropped)
            if not samples or req.finished:
                continue
            req.tokens_in_flight -= 1
            if batch.mode is ForwardMode.EXTEND:
                req.input_logprobs_done = True
                if req.sampling_params.max_new_tokens == 0:  # prompt scoring only
                    req.finish({"type": "length", "length": 0})
                    if req.req_pool_idx is not None:
                        self.kv.cache_and_release(req)
                    self._outputs.append(req.take_output())
                    continue
            top = None
            if out.top_ids is not None:
                k = req.top_logprobs_num
                top = list(zip(out.top_ids[i][:k], out.top_vals[i][:k]))
            logprob = math.nan if out.logprobs is None else out.logprobs[i]  # nan: not asked for
            self._append_token(req, out.next_token_ids[i], logprob, top)
        self.running = [r for r in self.running if not r.finished]

    def _append_token(
        self, req: Req, tok: int, logprob: float, top: list[tuple[int, float]] | None
    ) -> None:
        req.output_ids.append(tok)
        req.pending_token_ids.append(tok)
        req.pending_logprobs.append(logprob)
        if top is not None:
            req.pending_top_logprobs.append(top)
        retracted = req.state is ReqState.WAITING  # while this token was in flight
        req.check_finished(self.eos_ids, self._stop_text_hit(req), self.context_len)
        if req.finished:
            if retracted:
                self.waiting.remove(req)
            if req.req_pool_idx is not None:  # else retracted or released at its last launch
                # its last token needs no KV; more is the slot of a step launched meanwhile
                self.kv.truncate(req, req.fill_len - 1)
                self.kv.cache_and_release(req)
        self._outputs.append(req.take_output())

    def _stop_text_hit(self, req: Req) -> str | None:
        """The stop string the latest token completes, if any: none before min_new_tokens
        tokens exist, then by `stop_strings.find_stop`, the rule the final text is cut by."""
        stops, ids = req.sampling_params.stop, req.output_ids
        min_new = req.sampling_params.min_new_tokens
        if not stops or len(ids) < min_new:
            return None
        # a character is at most 4 bytes and every token at least one byte
        start = max(len(ids) - (4 * max(len(s) for s in stops) + 2), 0)
        window = ids[start:]
        tail = self.tokenizer.decode(window, skip_special_tokens=False)
        tok, min_in_window = self.tokenizer, min_new - start
        hit = (s for s in stops if find_stop(tok, window, tail, s, min_in_window, False) >= 0)
        return next(hit, None)

    def _collect_input_logprobs(self, batch: ScheduleBatch, out: StepResult) -> None:
        if out.input_logprobs is None:
            return
        vals, top_ids, top_vals = out.input_logprobs, out.input_top_ids, out.input_top_vals
        row = 0
        for req, start, end in zip(batch.reqs, batch.starts, batch.ends):
            if not req.wants_input_logprobs:
                continue
            fill = req.origin_input_ids  # prompt logprobs score prompt tokens only
            if start == 0 and req.logprob_start_len == 0:
                req.input_token_logprobs.append((fill[0], None))
                req.input_top_logprobs.append(None)
            first = max(req.logprob_start_len, 1) - 1
            for p in range(max(start, first), min(end, req.prompt_len - 1)):
                req.input_token_logprobs.append((fill[p + 1], vals[row]))
                if top_ids is not None and req.top_logprobs_num:
                    k = req.top_logprobs_num
                    req.input_top_logprobs.append(list(zip(top_ids[row][:k], top_vals[row][:k])))
                else:
                    req.input_top_logprobs.append(None)
                row += 1

    # ---- checks --------------------------------------------------------------------------

    def check_integrity(self, compare_device: bool = True) -> None:
        """KV ownership is whole (KVManager.check_integrity); `compare_device` also compares
        the device's req -> token table with the host's, which waits for the step in flight."""
        # a launched batch's requests own KV until processed, length-ended ones included
        in_flight = self.in_flight.reqs if self.in_flight is not None else []
        owners = {id(r): r for r in [*self.running, *in_flight]}
        if self.chunked:
            owners[id(self.chunked)] = self.chunked
        self.kv.check_integrity(list(owners.values()), compare_device)
