"""Prometheus metrics of one server, in a registry of its own.

A registry per app (not prometheus_client's global one) lets several apps live in one process,
as tests and embedding applications do, without "duplicated timeseries" errors, and makes
/metrics show exactly this server's numbers.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

_LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
_TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
_BATCH_BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 64)
_STEP_TOKEN_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048)
ENDPOINTS = ("/v1/chat/completions", "/v1/completions", "/v1/models", "/health", "/metrics")


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("slimlm_requests", "HTTP requests by endpoint and status code",
                                ["endpoint", "status"], registry=r)
        self.tokens = Counter("slimlm_tokens", "Tokens processed, by model and kind (prompt or completion)",
                              ["model", "kind"], registry=r)
        self.latency = Histogram("slimlm_request_latency_seconds", "Request arrival to last token",
                                 ["endpoint", "route"], buckets=_LATENCY_BUCKETS, registry=r)
        self.ttft = Histogram("slimlm_time_to_first_token_seconds", "Request arrival to first token "
                              "(queueing included)", ["model"], buckets=_TTFT_BUCKETS, registry=r)
        self.escalations = Counter("slimlm_escalations", "Requests the router sent to the large model",
                                   ["reason"], registry=r)
        self.queue_depth = Gauge("slimlm_queue_depth", "Requests waiting or running, per model", ["model"],
                                 registry=r)
        # continuous batching (batching.py): what each step held, and how long requests waited for a slot
        self.batch_size = Histogram("slimlm_batch_size", "Sequences in one batched step", ["model"],
                                    buckets=_BATCH_BUCKETS, registry=r)
        self.step_tokens = Histogram("slimlm_step_tokens", "Tokens read in one batched step (decode + prompt)",
                                     ["model"], buckets=_STEP_TOKEN_BUCKETS, registry=r)
        self.queue_wait = Histogram("slimlm_queue_wait_seconds", "Arrival to getting a slot", ["model"],
                                    buckets=_TTFT_BUCKETS, registry=r)
        self.prefix_hit = Gauge("slimlm_prefix_cache_hit_ratio", "Prompt tokens served from a cached prefix / all "
                                "prompt tokens, since start", ["model"], registry=r)
        self.store_bytes = Gauge("slimlm_prompt_store_bytes", "Host memory held by saved prompt caches (--cache-ram)",
                                 ["model"], registry=r)
        self.store_restored = Gauge("slimlm_prompt_store_restored", "Prompts restored from host memory into a "
                                    "slot, since start", ["model"], registry=r)

    def watch_queue(self, model: str, depth) -> None:
        """Read the queue depth from `depth()` at each scrape (always current, nothing to update)."""
        self.queue_depth.labels(model=model).set_function(depth)

    def watch_batcher(self, model: str, batcher) -> None:
        """Observe each step and each admission of a batching.Batcher; read the prefix-cache hit
        rate from its decoder at each scrape."""
        decoder = batcher.decoder

        def on_step(stats, seconds) -> None:
            self.batch_size.labels(model=model).observe(stats.decoding + stats.prefilling)
            self.step_tokens.labels(model=model).observe(stats.tokens)

        batcher.on_step.append(on_step)
        batcher.on_admit.append(lambda waited: self.queue_wait.labels(model=model).observe(waited))
        self.prefix_hit.labels(model=model).set_function(
            lambda: decoder.reused_tokens / decoder.prompt_tokens if decoder.prompt_tokens else 0.0)
        self.store_bytes.labels(model=model).set_function(lambda: decoder.store.size)
        self.store_restored.labels(model=model).set_function(lambda: decoder.store.restored)

    def count_request(self, path: str, status: int) -> None:
        self.requests.labels(endpoint=path if path in ENDPOINTS else "other", status=str(status)).inc()

    def observe(self, record: dict) -> None:
        """Fold one finished request (the record given to on_record) into the metrics."""
        model = record.get("model") or ""
        self.tokens.labels(model=model, kind="prompt").inc(record.get("tokens_in") or 0)
        self.tokens.labels(model=model, kind="completion").inc(record.get("tokens_out") or 0)
        if record.get("latency_s") is not None:
            self.latency.labels(endpoint=record.get("endpoint", ""), route=record.get("route", "")).observe(
                record["latency_s"])
        if record.get("ttft_s") is not None:
            self.ttft.labels(model=model).observe(record["ttft_s"])

    def render(self) -> bytes:
        return generate_latest(self.registry)
