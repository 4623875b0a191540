"""Annotation client: requests/s of annotate.LLMClient against a local chat-completions server, and resume.

annotate.py parallelises across records: `run_all` runs one record per thread of a ThreadPoolExecutor
(`--workers`, default 8), and one LLMClient (thread-safe: a lock around its cache and counters) serves all
threads; the stages of one record run one after another. Here each "record" is one complete_json call,
sent through the same run_all, so requests/s is the client's ceiling. The server (http.server in a child
process, HTTP/1.1 keep-alive) answers every request after a fixed --latency; the limit is workers/latency.
Kill and resume: a client run with --workers 32 is killed (SIGKILL) when the server has seen half of its
requests, then run again with the same cache file; the server counts how often each request arrived.
Goals: >= 80% of the limit at 32 workers; 0 requests sent again whose answer the killed run had recorded.
CPU ms per request of the client and server processes are printed beside: the client holds the GIL for
its share, so 1000 / client ms is its ceiling in requests/s whatever the number of workers.

    .venv/bin/python benchmarks/annotation_client.py [--latency 0.1] [--workers 1,8,32,64] [--repeats 3]
"""
import argparse
import http.server
import json
import multiprocessing
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections import Counter

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCHEMA = {"type": "object", "properties": {"echo": {"type": "string"}}, "required": ["echo"], "additionalProperties": False}


class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as real API servers
    disable_nagle_algorithm = True  # headers and body go out in two writes: without this, +40 ms (delayed ACK)

    def log_message(self, *args):
        pass

    def _send(self, payload: dict):
        raw = json.dumps(payload).encode()
        try:
            self.send_response(200)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(raw)))
            self.end_headers()
            self.wfile.write(raw)
        except (BrokenPipeError, ConnectionResetError):  # the killed client
            pass

    def do_GET(self):  # /stats: how often each request ID arrived
        with self.server.lock:
            self._send(dict(self.server.hits))

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["content-length"])))
        request_id = re.search(r"request (\S+)", body["messages"][-1]["content"]).group(1)
        with self.server.lock:
            self.server.hits[request_id] += 1
        time.sleep(self.server.latency)
        answer = json.dumps({"echo": request_id})  # the cache entry then names the request it answers
        self._send({"id": "chatcmpl-1", "object": "chat.completion", "created": 0, "model": body["model"],
                    "choices": [{"index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": answer}}],
                    "usage": {"prompt_tokens": 100, "completion_tokens": 10, "total_tokens": 110}})


def serve(latency: float, port_out):
    """The server process: answers chat completions after `latency` seconds; reports its port."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    server.daemon_threads, server.request_queue_size = True, 512
    server.handle_error = lambda request, address: None  # connections reset by the killed client
    server.lock, server.hits, server.latency = threading.Lock(), Counter(), latency
    port_out.put(server.server_port)
    server.serve_forever()


def server_hits(url: str) -> Counter:
    with urllib.request.urlopen(url.removesuffix("/v1") + "/stats") as r:
        return Counter(json.load(r))


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds a process has used so far."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def run_client(url: str, cache: str | None, ids: list[str], workers: int) -> float:
    """ids sent through annotate.run_all with `workers` threads, one complete_json each -> seconds taken."""
    import annotate

    client = annotate.LLMClient(url, "bench", cache, max_retries=0, timeout=60)
    fn = lambda i: client.complete_json([{"role": "user", "content": f"request {i}"}], SCHEMA)  # noqa: E731
    start = time.perf_counter()
    _, failures = annotate.run_all(fn, ids, ids, workers, client, "requests")
    if failures:
        raise RuntimeError(f"{len(failures)} requests failed, e.g. {next(iter(failures.values()))}")
    return time.perf_counter() - start


def kill_and_resume(url: str, n: int, workers: int, folder: str) -> dict:
    """A client run killed after n/2 server hits, then run again on its cache -> hit counts."""
    cache = os.path.join(folder, "resume.cache.jsonl")
    ids = [f"resume-{k}" for k in range(n)]
    cmd = [sys.executable, os.path.abspath(__file__), "--_client", url, cache, str(workers), ",".join(ids)]
    child = subprocess.Popen(cmd, env={**os.environ, "TQDM_DISABLE": "1"})
    while child.poll() is None:
        hits = server_hits(url)
        if sum(hits[i] for i in ids) >= n // 2:
            break
        time.sleep(0.005)
    os.kill(child.pid, signal.SIGKILL)
    child.wait()
    first = server_hits(url)
    with open(cache) as f:  # the killed run's recorded answers (a last line cut short is not an answer)
        entries = [json.loads(line) for line in f if line.endswith("\n")]
    recorded = {json.loads(e["content"])["echo"] for e in entries if e["status"] == "ok"}
    subprocess.run(cmd, check=True, env={**os.environ, "TQDM_DISABLE": "1"})
    total = server_hits(url)
    second = {i: total[i] - first[i] for i in ids}
    return {"requests": n, "workers": workers, "hits_killed_run": sum(first[i] for i in ids),
            "recorded_before_kill": len(recorded), "hits_resumed_run": sum(second.values()),
            "hits_total": sum(total[i] for i in ids),
            "resent_after_recorded": sum(second[i] for i in recorded),  # the goal: 0
            "resent_in_flight_at_kill": sum(second[i] for i in ids if first[i] and i not in recorded),
            "unanswered_after_resume": sum(1 for i in ids if not total[i])}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--latency", type=float, default=0.1, help="server seconds per answer")
    p.add_argument("--workers", default="1,8,32,64")
    p.add_argument("--rounds", type=int, default=10, help="requests per worker level = rounds * workers (min 20)")
    p.add_argument("--repeats", type=int, default=3, help="runs per worker level (median reported)")
    p.add_argument("--resume-requests", type=int, default=400)
    p.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "annotation_client.json"))
    p.add_argument("--_client", nargs=4, metavar=("URL", "CACHE", "WORKERS", "IDS"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    os.environ["TQDM_DISABLE"] = "1"  # run_all's progress bar
    sys.path.insert(0, ROOT)
    if args._client:
        url, cache, workers, ids = args._client
        return run_client(url, cache, ids.split(","), int(workers))
    ports = multiprocessing.get_context("spawn").Queue()
    server = multiprocessing.get_context("spawn").Process(target=serve, args=(args.latency, ports), daemon=True)
    server.start()
    url = f"http://127.0.0.1:{ports.get(timeout=30)}/v1"
    rows = []
    print(f"server latency {args.latency * 1000:.0f} ms; annotate.run_all + LLMClient.complete_json (cache on); "
          f"median of {args.repeats} runs")
    print(f"{'workers':>7} {'requests':>8} {'req/s':>8} {'limit':>8} {'of limit':>8} {'client CPU':>10} {'server CPU':>10}"
          "  (CPU: ms per request)")
    with tempfile.TemporaryDirectory() as folder:
        run_client(url, None, [f"warm-up-{k}" for k in range(8)], 8)  # imports openai, starts the server's threads
        for workers in map(int, args.workers.split(",")):
            n, times = max(20, args.rounds * workers), []
            cpu = cpu_seconds(os.getpid()), cpu_seconds(server.pid)
            for r in range(args.repeats):  # fresh request IDs and cache each time: nothing is answered from cache
                ids = [f"w{workers}-r{r}-{k}" for k in range(n)]
                times.append(run_client(url, os.path.join(folder, f"w{workers}-r{r}.cache.jsonl"), ids, workers))
            client_ms, server_ms = ((cpu_seconds(pid) - c) * 1000 / (n * args.repeats)
                                    for pid, c in zip((os.getpid(), server.pid), cpu))
            seconds = statistics.median(times)
            limit = workers / args.latency
            rows.append({"workers": workers, "requests": n, "requests_per_s": n / seconds, "limit": limit,
                         "fraction_of_limit": n / seconds / limit, "client_cpu_ms_per_request": client_ms,
                         "server_cpu_ms_per_request": server_ms})
            print(f"{workers:7} {n:8} {n / seconds:8.1f} {limit:8.0f} {n / seconds / limit:8.0%} "
                  f"{client_ms:10.1f} {server_ms:10.1f}", flush=True)
        resume = kill_and_resume(url, args.resume_requests, 32, folder)
    server.terminate()
    print("\nkill and resume (32 workers): " + ", ".join(f"{k} {v}" for k, v in resume.items()))
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({"latency_s": args.latency, "throughput": rows, "kill_and_resume": resume}, f, indent=1)
    at32 = [r["fraction_of_limit"] for r in rows if r["workers"] == 32]
    print(f"goal >= 80% of the limit at 32 workers: {'met' if at32 and at32[0] >= 0.8 else 'NOT met'}"
          f"{f' ({at32[0]:.0%})' if at32 else ''}; goal 0 repeated requests after resume: "
          f"{'met' if resume['resent_after_recorded'] == 0 else 'NOT met'}; wrote {args.out}")


if __name__ == "__main__":
    main()
