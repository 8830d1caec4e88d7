"""Connects Databricks' own agent library, `databricks-mcp` (DatabricksMCPClient), to a managed
MCP server through Envoy, authenticating with a databricks-sdk WorkspaceClient.

Usage: MCP_TOKEN=<IdP JWT> databricks_mcp_client.py <envoy url> <server path> <tool> <json arguments>

Lists the tools and calls one; prints {"tools", "is_error", "texts"}, or {"tools", "error",
"message"} when the call raised (e.g. a JSON-RPC error from aegis). The token is read from the
environment so it never appears on a command line.
"""

import json
import os
import sys

from databricks.sdk import WorkspaceClient
from databricks_mcp import DatabricksMCPClient

host, path, tool, args = sys.argv[1], sys.argv[2], sys.argv[3], json.loads(sys.argv[4])
w = WorkspaceClient(host=host, token=os.environ["MCP_TOKEN"], auth_type="pat")
client = DatabricksMCPClient(server_url=f"{host}{path}", workspace_client=w)
out = {"tools": sorted(t.name for t in client.list_tools())}
try:
    result = client.call_tool(tool, args)
    out["is_error"] = bool(result.isError)
    out["texts"] = [c.text for c in result.content if getattr(c, "type", "") == "text"]
except Exception as e:  # noqa: BLE001 - the library raises what the MCP session raised
    # The MCP session runs in an anyio task group, so the JSON-RPC error may arrive wrapped in
    # an ExceptionGroup: report the innermost error.
    while isinstance(e, BaseExceptionGroup) and len(e.exceptions) == 1:
        e = e.exceptions[0]
    out["error"] = type(e).__name__
    out["message"] = str(e)
    data = getattr(getattr(e, "error", None), "data", None)
    if data is not None:
        out["data"] = data
print(json.dumps(out))
