#!/usr/bin/env python3
"""Whether structured output leaks: sends rounds of requests that all hold their reply to a
grammar (regexes, choices with a new word each, JSON schemas with a key that changes every
fiftieth) to a running `awq-run serve`, eight at a time, and prints the server's resident memory
after each round. Standard library only.

  scripts/grammar_memory.py URL SERVER_PID [REQUESTS_PER_ROUND] [ROUNDS]
  e.g. scripts/grammar_memory.py http://127.0.0.1:8080 $(pgrep -f 'awq-run serve') 500 4
"""
import concurrent.futures
import json
import sys
import urllib.request

url, pid = sys.argv[1], sys.argv[2]
per_round = int(sys.argv[3]) if len(sys.argv) > 3 else 500
rounds = int(sys.argv[4]) if len(sys.argv) > 4 else 4


def rss_mib():
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS"):
                return int(line.split()[1]) // 1024


def request(i):
    key = f"k{i % 50}"
    grammars = [
        {"guided_regex": "[a-z]{1,6}"},
        {"guided_choice": ["alpha", "beta", f"w{i}"]},
        {"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {
            "type": "object", "properties": {key: {"type": "integer"}}, "required": [key]}}}},
    ]
    body = {"prompt": f"item {i}:", "max_tokens": 12, "temperature": 0.9, "seed": i, **grammars[i % 3]}
    req = urllib.request.Request(f"{url}/v1/completions", json.dumps(body).encode(), {"Content-Type": "application/json"})
    with urllib.request.urlopen(req) as r:
        return json.load(r)["choices"][0]["finish_reason"]


with concurrent.futures.ThreadPoolExecutor(8) as pool:
    for k in range(rounds):
        ends = list(pool.map(request, range(k * per_round, (k + 1) * per_round)))
        counts = {e: ends.count(e) for e in sorted(set(ends))}
        print(f"after {(k + 1) * per_round} grammar requests: server RSS {rss_mib()} MiB; finish reasons {counts}", flush=True)
