"""Sequential-call latency through Python grpcio, the way a real client calls the API: one
channel, one call after another, each waiting for the previous answer.

Driven by `bench-api` (tests/src/bin/bench_api.rs) through run_grpcio_client.sh. Reads the API
address and token from API_ADDR and API_TOKEN, the conversation ids to fetch (comma-separated)
from BENCH_CONVERSATION_IDS, the inbox to list from BENCH_INBOX, and how many calls of each kind
to time from BENCH_CALLS (BENCH_WARMUP_CALLS more are made first and not timed). Prints one JSON
object per call kind: {"call": ..., "n": ..., "latencies_ms": [...]}.
"""
import json
import os
import sys
import time

import grpc

from switchboard.api.v1 import conversations_pb2, conversations_pb2_grpc


def timed_calls(call, requests, warmup_calls):
    latencies_ms = []
    for index, request in enumerate(requests):
        started = time.perf_counter()
        call(request)
        elapsed_ms = (time.perf_counter() - started) * 1e3
        if index >= warmup_calls:
            latencies_ms.append(elapsed_ms)
    return latencies_ms


def main():
    address = os.environ["API_ADDR"]
    token = os.environ["API_TOKEN"]
    conversation_ids = os.environ["BENCH_CONVERSATION_IDS"].split(",")
    inbox = os.environ["BENCH_INBOX"]
    calls = int(os.environ["BENCH_CALLS"])
    warmup_calls = int(os.environ.get("BENCH_WARMUP_CALLS", "100"))
    auth = [("authorization", f"Bearer {token}")]
    total = warmup_calls + calls

    with grpc.insecure_channel(address) as channel:
        conversations = conversations_pb2_grpc.ConversationServiceStub(channel)

        def get(request):
            conversations.GetConversation(request, metadata=auth, timeout=10)

        def list_first_page(request):
            listed = conversations.ListConversations(request, metadata=auth, timeout=10)
            if len(listed.conversations) != request.page_size:
                raise SystemExit(f"expected {request.page_size} conversations, got {len(listed.conversations)}")

        get_requests = [
            conversations_pb2.GetConversationRequest(conversation_id=conversation_ids[index % len(conversation_ids)])
            for index in range(total)
        ]
        list_requests = [
            conversations_pb2.ListConversationsRequest(inbox_id=inbox, page_size=50) for _ in range(total)
        ]
        for name, call, requests in [
            ("GetConversation", get, get_requests),
            ("ListConversations", list_first_page, list_requests),
        ]:
            latencies_ms = timed_calls(call, requests, warmup_calls)
            print(json.dumps({"call": name, "n": len(latencies_ms), "latencies_ms": latencies_ms}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
