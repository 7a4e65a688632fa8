"""Prometheus metrics of one api server (fed by the tokenizer manager, scraped at /metrics).

Each app gets its own CollectorRegistry, so two servers in one process (tests) do not share
counters. Every series carries a `model` label: the served model name for base requests and
scheduler gauges, the adapter's name for a request that used one. Token counters count what was
served: the prompt of a request that got past prefill, and every generated token.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import HistogramMetricFamily

from sglora.messages import SchedulerStats, SlotLoadHistogram

PREFIX = "sglora:"
# seconds; the low end resolves CPU tiny models, the high end long generations on a busy GPU
TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
TPOT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5)
E2E_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r, m = self.registry, ["model"]
        self.prompt_tokens = Counter(
            PREFIX + "prompt_tokens", "Prompt tokens prefilled.", m, registry=r
        )
        self.generation_tokens = Counter(
            PREFIX + "generation_tokens", "Tokens generated.", m, registry=r
        )
        self.cached_tokens = Counter(
            PREFIX + "cached_tokens", "Prompt tokens served from the prefix cache.", m, registry=r
        )
        self.requests = Counter(
            PREFIX + "requests",
            "Finished requests by finish reason.",
            ["model", "finish_reason"],
            registry=r,
        )
        self.ttft = Histogram(
            PREFIX + "time_to_first_token_seconds",
            "Time from arrival to the first output token.",
            m,
            buckets=TTFT_BUCKETS,
            registry=r,
        )
        self.tpot = Histogram(
            PREFIX + "time_per_output_token_seconds",
            "Mean time between output tokens of a request.",
            m,
            buckets=TPOT_BUCKETS,
            registry=r,
        )
        self.e2e = Histogram(
            PREFIX + "e2e_request_latency_seconds",
            "Time from arrival to the last output token.",
            m,
            buckets=E2E_BUCKETS,
            registry=r,
        )
        self.running = Gauge(
            PREFIX + "num_running_reqs",
            "Requests holding KV (decoding or prefilling).",
            m,
            registry=r,
        )
        self.waiting = Gauge(
            PREFIX + "num_waiting_reqs", "Requests queued for admission.", m, registry=r
        )
        self.kv_usage = Gauge(
            PREFIX + "kv_cache_usage",
            "Share of KV slots not free (running requests and the prefix cache), 0..1.",
            m,
            registry=r,
        )
        self.kv_used = Gauge(PREFIX + "kv_used_tokens", "KV slots not free.", m, registry=r)
        self.kv_cached = Gauge(
            PREFIX + "kv_cached_tokens", "KV slots held by the prefix cache.", m, registry=r
        )
        self.lora_loaded = Gauge(
            PREFIX + "lora_loaded_adapters", "LoRA adapters requests may use.", m, registry=r
        )
        self.lora_resident = Gauge(
            PREFIX + "lora_resident_adapters",
            "LoRA adapters in a device slot (of --max-loras-per-batch).",
            m,
            registry=r,
        )
        self.slot_loads = _SlotLoadCollector()
        r.register(self.slot_loads)

    def on_first_token(self, model: str, ttft: float) -> None:
        self.ttft.labels(model).observe(ttft)

    def on_finish(
        self,
        model: str,
        reason: str,
        prompt_tokens: int,
        completion_tokens: int,
        cached_tokens: int,
        e2e: float,
        decode_time: float | None,
    ) -> None:
        """`decode_time`: seconds from the first to the last token (None if no token)."""
        self.requests.labels(model, reason).inc()
        if completion_tokens > 0 or reason != "abort":  # aborted before prefill: nothing served
            self.prompt_tokens.labels(model).inc(prompt_tokens)
            self.cached_tokens.labels(model).inc(cached_tokens)
        self.generation_tokens.labels(model).inc(completion_tokens)
        self.e2e.labels(model).observe(e2e)
        if decode_time is not None and completion_tokens > 1:
            self.tpot.labels(model).observe(decode_time / (completion_tokens - 1))

    def set_scheduler_stats(self, model: str, stats: SchedulerStats) -> None:
        self.running.labels(model).set(stats.running)
        self.waiting.labels(model).set(stats.waiting)
        self.kv_used.labels(model).set(stats.kv_used_tokens)
        self.kv_cached.labels(model).set(stats.kv_cached_tokens)
        self.kv_usage.labels(model).set(stats.kv_used_tokens / max(stats.kv_capacity, 1))
        if stats.lora is not None:
            self.lora_loaded.labels(model).set(len(stats.lora.loaded))
            self.lora_resident.labels(model).set(sum(n is not None for n in stats.lora.slots))
            if stats.lora.slot_loads is not None:
                self.slot_loads.latest[model] = stats.lora.slot_loads

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _SlotLoadCollector:
    """`sglora:lora_slot_load_seconds`: the scheduler keeps the histogram (it does the loads)
    and sends it whole with its stats, so this renders the latest copy instead of observing."""

    def __init__(self) -> None:
        self.latest: dict[str, SlotLoadHistogram] = {}  # model label -> histogram

    def collect(self):
        fam = HistogramMetricFamily(
            PREFIX + "lora_slot_load_seconds",
            "Host time to load an adapter into a device slot (packing and queueing the "
            "host-to-device copy, not the copy itself), per load.",
            labels=["model"],
        )
        for model, h in self.latest.items():
            buckets = [(repr(float(b)), c) for b, c in zip(h.bounds, h.counts)]
            fam.add_metric([model], [*buckets, ("+Inf", h.count)], h.total_seconds)
        yield fam
