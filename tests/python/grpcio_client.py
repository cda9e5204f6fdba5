"""A Python grpcio client of the Switchboard API (stubs generated from our .proto files).

Authenticates with a bearer token, checks that calls without one are refused, lists the
conversations of an inbox, and follows a watch stream from a resume position. Prints one JSON
object per step on stdout; exits non-zero on any mismatch. Driven by tests/tests/api_grpcio.rs.
"""
import json
import os
import sys

import grpc

from switchboard.api.v1 import admin_pb2, admin_pb2_grpc  # noqa: F401  (stubs must import)
from switchboard.api.v1 import conversations_pb2, conversations_pb2_grpc
from switchboard.api.v1 import workspace_pb2, workspace_pb2_grpc


def emit(**fields):
    print(json.dumps(fields), flush=True)


def main():
    address = os.environ["API_ADDR"]
    token = os.environ["API_TOKEN"]
    inbox = os.environ.get("API_INBOX", "support")
    expect_conversations = int(os.environ["EXPECT_CONVERSATIONS"])
    watch_after = int(os.environ["WATCH_AFTER"])
    expect_changes = int(os.environ["EXPECT_CHANGES"])
    auth = [("authorization", f"Bearer {token}")]

    with grpc.insecure_channel(address) as channel:
        conversations = conversations_pb2_grpc.ConversationServiceStub(channel)
        workspace = workspace_pb2_grpc.WorkspaceServiceStub(channel)

        try:
            conversations.ListConversations(conversations_pb2.ListConversationsRequest(inbox_id=inbox), timeout=10)
            emit(step="unauthenticated", error="call without a token succeeded")
            return 1
        except grpc.RpcError as error:
            if error.code() != grpc.StatusCode.UNAUTHENTICATED:
                emit(step="unauthenticated", error=str(error.code()))
                return 1
            emit(step="unauthenticated", code=error.code().name)

        inboxes = workspace.ListInboxes(workspace_pb2.ListInboxesRequest(), metadata=auth, timeout=10)
        emit(step="inboxes", ids=sorted(inbox.id for inbox in inboxes.inboxes))

        listed = conversations.ListConversations(
            conversations_pb2.ListConversationsRequest(inbox_id=inbox, page_size=50), metadata=auth, timeout=10
        )
        ids = [conversation.id for conversation in listed.conversations]
        emit(step="list", count=len(ids), ids=ids)
        if len(ids) != expect_conversations:
            return 1

        stream = conversations.WatchConversations(
            conversations_pb2.WatchConversationsRequest(after_change_id=watch_after), metadata=auth, timeout=60
        )
        received = []
        for change in stream:
            received.append(change.change_id)
            emit(step="change", change_id=change.change_id, inbox_id=change.inbox_id, kind=change.kind,
                 conversation_id=change.conversation_id)
            if len(received) == expect_changes:
                break
        stream.cancel()
        emit(step="done", changes=received)
    return 0


if __name__ == "__main__":
    sys.exit(main())
