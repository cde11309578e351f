"""Prometheus metrics of the agent, served by the local API at ``/metrics``.

Unlike the health report's figures, which restart with each activated model so a
rollout compares models, these count over the agent's whole life (labelled by
model and version), as Prometheus expects of counters.
"""

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

_LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
                    2.5, 5.0, 10.0, 30.0)


class AgentMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.inferences = Counter("edgefleet_agent_inferences", "Inference requests served.",
                                  ["model", "version"], registry=self.registry)
        self.errors = Counter("edgefleet_agent_inference_errors",
                              "Inference requests that failed in the runtime.",
                              ["model", "version"], registry=self.registry)
        self.latency = Histogram("edgefleet_agent_inference_seconds",
                                 "Inference latency, runtime worker round trip.",
                                 ["model", "version"], buckets=_LATENCY_BUCKETS,
                                 registry=self.registry)
        self.queued = Gauge("edgefleet_agent_requests_waiting",
                            "Requests waiting for the busy model.", registry=self.registry)
        self.refused = Counter("edgefleet_agent_requests_refused",
                               "Requests refused with 429: the queue was full.",
                               registry=self.registry)
        self.installs = Counter("edgefleet_agent_installs",
                                "Installs that ended, by outcome (committed, failed, "
                                "rolled_back).", ["state"], registry=self.registry)
        model = ["model", "version"]
        self.client_errors = Counter(
            "edgefleet_agent_client_errors", "Requests answered 4xx: the client's fault "
            "(bad parameters, unknown model, too large, busy, loading), never counted "
            "against the model.", model, registry=self.registry)
        self.load_seconds = Gauge("edgefleet_agent_model_load_seconds",
                                  "How long the model's worker took to load it.", model,
                                  registry=self.registry)
        self.worker_rss = Gauge("edgefleet_agent_model_worker_rss_bytes",
                                "Resident memory of the model's worker process.", model,
                                registry=self.registry)
        self.first_token = Histogram(
            "edgefleet_agent_time_to_first_token_seconds", "Streamed generations: from the "
            "request to its first token.", model, buckets=_LATENCY_BUCKETS,
            registry=self.registry)
        self.tokens = Counter("edgefleet_agent_generated_tokens", "Tokens generated.", model,
                              registry=self.registry)
        self.generation_seconds = Counter(
            "edgefleet_agent_generation_seconds", "Time spent on the generations counted in "
            "edgefleet_agent_generated_tokens (tokens/s: the rate of one over the other).",
            model, registry=self.registry)
