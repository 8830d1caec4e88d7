"""Connects the official `mcp` Python SDK to a Databricks managed MCP server through Envoy.

Usage:
  MCP_TOKEN=<IdP JWT> mcp_client.py call <server url> <tool> <json arguments>
      initialize, list the tools, call one; prints {"server", "tools", "is_error", "texts"}, or
      {"server", "tools", "jsonrpc_error"} when the call is answered with a JSON-RPC error.
  mcp_client.py discover <server url>
      no token: the request is refused with 401, and the SDK's own RFC 9728 discovery helpers
      follow the challenge to the Protected Resource Metadata; prints what they found.
"""

import asyncio
import json
import os
import sys

import httpx
from mcp import ClientSession
from mcp.shared.exceptions import McpError
from mcp.client.auth.utils import (
    build_protected_resource_metadata_discovery_urls,
    extract_resource_metadata_from_www_auth,
    handle_protected_resource_response,
)
from mcp.client.streamable_http import streamablehttp_client


async def call(url, tool, args):
    headers = {"Authorization": f"Bearer {os.environ['MCP_TOKEN']}", "User-Agent": "mcp-test-agent/1.0"}
    async with streamablehttp_client(url, headers=headers, timeout=30) as (read, write, _):
        async with ClientSession(read, write) as session:
            init = await session.initialize()
            tools = await session.list_tools()
            try:
                result = await session.call_tool(tool, args)
            except McpError as e:
                # A JSON-RPC error answered for the call (e.g. aegis refusing it).
                return {
                    "server": init.serverInfo.name,
                    "tools": sorted(t.name for t in tools.tools),
                    "jsonrpc_error": {"code": e.error.code, "message": e.error.message, "data": e.error.data},
                }
            return {
                "server": init.serverInfo.name,
                "protocol": init.protocolVersion,
                "tools": sorted(t.name for t in tools.tools),
                "is_error": bool(result.isError),
                "texts": [c.text for c in result.content if getattr(c, "type", "") == "text"],
            }


async def discover(url):
    async with httpx.AsyncClient(timeout=30) as client:
        init = {
            "jsonrpc": "2.0",
            "id": 1,
            "method": "initialize",
            "params": {"protocolVersion": "2025-06-18", "capabilities": {}, "clientInfo": {"name": "probe", "version": "1"}},
        }
        first = await client.post(url, json=init, headers={"Accept": "application/json, text/event-stream"})
        hinted = extract_resource_metadata_from_www_auth(first)
        found = None
        tried = []
        for candidate in build_protected_resource_metadata_discovery_urls(hinted, url):
            tried.append(candidate)
            prm = await handle_protected_resource_response(await client.get(candidate))
            if prm:
                found = prm
                break
        return {
            "status": first.status_code,
            "www_authenticate": first.headers.get("www-authenticate"),
            "error": (first.json() or {}).get("error") if first.headers.get("content-type", "").startswith("application/json") else None,
            "resource_metadata": hinted,
            "tried": tried,
            "resource": str(found.resource) if found else None,
            "authorization_servers": [str(s) for s in found.authorization_servers] if found else [],
        }


def main():
    mode, url = sys.argv[1], sys.argv[2]
    if mode == "call":
        out = asyncio.run(call(url, sys.argv[3], json.loads(sys.argv[4])))
    else:
        out = asyncio.run(discover(url))
    print(json.dumps(out))


if __name__ == "__main__":
    main()
