"""The load signals an inference gateway routes on, under orcd's names and the names the
Kubernetes Gateway API Inference Extension's endpoint picker (EPP) reads by default.

The EPP's model server protocol asks for three gauges, each read at every scrape (it scrapes the
InferencePool's target port, path /metrics, every 50 ms by default):

  TotalQueuedRequests   vllm:num_requests_waiting   = orcd_queue_depth
  TotalRunningRequests  vllm:num_requests_running   = orcd_running_sequences
  KVCacheUtilization    vllm:kv_cache_usage_perc    = orcd_kv_cache_usage_ratio (a fraction, 0..1)

vllm:gpu_cache_usage_perc is the same fraction under vLLM's older name, which EPP releases before
the rename read. The EPP can be pointed at orcd's own names instead (--total-queued-requests-metric,
--total-running-requests-metric, --kv-cache-usage-percentage-metric); the aliases exist so that a
default EPP works unchanged. Values come from the scheduler at scrape time, not from the gauges the
engine thread last set, so a scrape between steps is current.
"""
from __future__ import annotations

from prometheus_client.core import GaugeMetricFamily

#: orcd's name -> the aliases the EPP protocol reads (docs and tests take the mapping from here)
ALIASES = {
    "orcd_queue_depth": ("vllm:num_requests_waiting",),
    "orcd_running_sequences": ("vllm:num_requests_running",),
    "orcd_kv_cache_usage_ratio": ("vllm:kv_cache_usage_perc", "vllm:gpu_cache_usage_perc"),
}


class PoolMetricsCollector:
    """A prometheus_client collector over a Scheduler."""

    def __init__(self, scheduler):
        self.scheduler = scheduler

    def _values(self) -> tuple[int, int, float]:
        stats = self.scheduler.stats()
        engine = self.scheduler.engine
        usage = 0.0
        if engine is not None:
            try:
                total = int(engine.total_blocks())
                usage = (total - int(engine.free_blocks())) / total if total else 0.0
            except Exception:  # an engine being swapped out: report an empty cache, not a failed scrape
                usage = 0.0
        return stats["waiting"], stats["running"], usage

    def describe(self):
        # Names only: describing must not touch the scheduler (registration happens before it runs).
        yield GaugeMetricFamily("orcd_kv_cache_usage_ratio", "Fraction of KV cache blocks in use (0..1)")
        for aliases in ALIASES.values():
            for name in aliases:
                yield GaugeMetricFamily(name, "alias for the Gateway API Inference Extension")

    def collect(self):
        waiting, running, usage = self._values()
        values = {"orcd_queue_depth": waiting, "orcd_running_sequences": running, "orcd_kv_cache_usage_ratio": usage}
        yield GaugeMetricFamily("orcd_kv_cache_usage_ratio", "Fraction of KV cache blocks in use (0..1)", value=usage)
        for own, aliases in ALIASES.items():
            for name in aliases:
                yield GaugeMetricFamily(name, f"{own} under the name the Gateway API Inference Extension's "
                                              "endpoint picker reads", value=values[own])
