"""Drives the official databricks-sdk's clusters and command execution APIs through Envoy.

Usage:
  SDK_TOKEN=<IdP JWT> sdk_compute.py <envoy url> clusters <cluster id>...
      lists the clusters, gets each one named, starts each terminated one (waiting for RUNNING);
      prints {"list": [...], "get": {...}, "start": {...}}.
  SDK_TOKEN=<IdP JWT> sdk_compute.py <envoy url> commands <cluster id> <language> <commands file>
      creates an execution context (waiting for it to run) and executes each command of the JSON
      list in the file, waiting for each to finish; prints {"context": ..., "results": [...]}.

Every result is what the workspace returned, or the error the SDK raised. The token is read from
the environment so it never appears on a command line.
"""

import json
import os
import sys
from datetime import timedelta

from databricks.sdk import WorkspaceClient
from databricks.sdk.errors import DatabricksError, OperationFailed
from databricks.sdk.service.compute import Language

host, mode = sys.argv[1], sys.argv[2]
w = WorkspaceClient(host=host, token=os.environ["SDK_TOKEN"], auth_type="pat")
WAIT = timedelta(seconds=60)


def error(e):
    return {"error": type(e).__name__, "error_code": getattr(e, "error_code", None), "message": str(e)}


def clusters(ids):
    out = {"list": sorted(c.cluster_id for c in w.clusters.list()), "get": {}, "start": {}}
    for cid in ids:
        try:
            c = w.clusters.get(cid)
            out["get"][cid] = {"state": c.state.value, "name": c.cluster_name}
        except DatabricksError as e:
            out["get"][cid] = error(e)
            continue
        if c.state.value == "TERMINATED":
            try:
                started = w.clusters.start(cid).result(timeout=WAIT)
                out["start"][cid] = started.state.value
            except (DatabricksError, OperationFailed) as e:
                out["start"][cid] = error(e)
    return out


def result(status):
    r = status.results
    res = {"status": status.status.value if status.status else None}
    if r is not None:
        res["result_type"] = r.result_type.value if r.result_type else None
        res["data"] = r.data
        if r.schema:
            res["columns"] = [c["name"] for c in r.schema]
        if r.cause:
            res["cause"] = r.cause
    return res


def commands(cluster_id, language, path):
    with open(path, encoding="utf-8") as f:
        texts = json.load(f)
    lang = Language(language)
    try:
        ctx = w.command_execution.create(cluster_id=cluster_id, language=lang).result(timeout=WAIT)
    except (DatabricksError, OperationFailed) as e:
        return {"context": error(e), "results": []}
    results = []
    for text in texts:
        try:
            done = w.command_execution.execute(
                cluster_id=cluster_id, context_id=ctx.id, language=lang, command=text
            ).result(timeout=WAIT)
            results.append(result(done))
        except (DatabricksError, OperationFailed) as e:
            results.append(error(e))
    w.command_execution.destroy(cluster_id=cluster_id, context_id=ctx.id)
    return {"context": {"status": ctx.status.value}, "results": results}


if mode == "clusters":
    out = clusters(sys.argv[3:])
else:
    out = commands(sys.argv[3], sys.argv[4], sys.argv[5])
print(json.dumps(out))
