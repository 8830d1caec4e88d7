"""Drives the official databricks-sdk's Delta Sharing and AI/BI dashboard APIs through Envoy.

Usage:
  SDK_TOKEN=<IdP JWT> sdk_sharing.py <envoy url> sharing <changes json>
      lists and reads shares, their permissions, recipients and providers, then applies each
      change of the JSON list [[share, principal, "add"|"remove"], ...] with
      w.shares.update_permissions; prints what each call returned or the error it raised.
  SDK_TOKEN=<IdP JWT> sdk_sharing.py <envoy url> dashboards <dashboard id>...
      lists the dashboards, gets each one named and its published version, and runs each
      dataset of a published dashboard on its warehouse as this user (the published dashboard
      embeds no credentials); prints the rows or the error.

The token is read from the environment so it never appears on a command line.
"""

import json
import os
import sys

from databricks.sdk import WorkspaceClient
from databricks.sdk.errors import DatabricksError
from databricks.sdk.service.sharing import PermissionsChange

host, mode = sys.argv[1], sys.argv[2]
w = WorkspaceClient(host=host, token=os.environ["SDK_TOKEN"], auth_type="pat")


def error(e):
    return {"error": type(e).__name__, "error_code": getattr(e, "error_code", None), "message": str(e)}


def attempt(fn):
    try:
        return fn()
    except DatabricksError as e:
        return error(e)


def grants(resp):
    return sorted(
        f"{a.principal}:{','.join(p.value if hasattr(p, 'value') else str(p) for p in a.privileges or [])}"
        for a in resp.privilege_assignments or []
    )


def sharing(changes):
    out = {
        "shares": attempt(lambda: sorted(s.name for s in w.shares.list_shares())),
        "get": {},
        "permissions": {},
        "recipients": attempt(lambda: sorted(r.name for r in w.recipients.list())),
        "recipient": attempt(lambda: w.recipients.get("partner_acme").owner),
        "providers": attempt(lambda: sorted(p.name for p in w.providers.list())),
        "changes": [],
    }
    for name in ["sales_share", "hr_share"]:
        out["get"][name] = attempt(lambda: [o.name for o in w.shares.get(name).objects or []])
        out["permissions"][name] = attempt(lambda: grants(w.shares.share_permissions(name)))
    for share, principal, verb in changes:
        change = PermissionsChange(principal=principal, **{verb: ["SELECT"]})
        out["changes"].append(attempt(lambda: grants(w.shares.update_permissions(share, changes=[change]))))
    return out


def run_datasets(dashboard_id, warehouse_id):
    definition = json.loads(w.lakeview.get(dashboard_id).serialized_dashboard)
    results = {}
    for ds in definition["datasets"]:
        resp = w.statement_execution.execute_statement(
            statement="".join(ds["queryLines"]), warehouse_id=warehouse_id, wait_timeout="30s"
        )
        res = {"state": resp.status.state.value}
        if resp.status.error:
            res["error"] = resp.status.error.message
        if resp.result is not None:
            res["rows"] = resp.result.data_array or []
        results[ds["displayName"]] = res
    return results


def dashboards(ids):
    out = {"list": sorted(d.dashboard_id for d in w.lakeview.list()), "get": {}, "published": {}}
    for did in ids:
        out["get"][did] = attempt(lambda: w.lakeview.get(did).display_name)
        try:
            pub = w.lakeview.get_published(did)
        except DatabricksError as e:
            out["published"][did] = error(e)
            continue
        out["published"][did] = {
            "embed_credentials": pub.embed_credentials,
            "warehouse_id": pub.warehouse_id,
            "datasets": run_datasets(did, pub.warehouse_id),
        }
    return out


if mode == "sharing":
    out = sharing(json.loads(sys.argv[3]))
else:
    out = dashboards(sys.argv[3:])
print(json.dumps(out))
