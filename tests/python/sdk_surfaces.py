"""Drives the official databricks-sdk through Envoy (and so through aegis) as one user.

Usage: SDK_TOKEN=<IdP JWT> sdk_surfaces.py <envoy url> <warehouse id> <genie space> <other space>

Prints one JSON object on stdout: what each Databricks surface returned to this user, or the
error the workspace raised. The Rust test (tests/surfaces.rs) asserts on it. The token is read
from the environment so it never appears on a command line.
"""

import json
import os
import sys
import time

from databricks.sdk import WorkspaceClient
from databricks.sdk.errors import DatabricksError, OperationFailed
from databricks.sdk.service.sql import StatementState

host, warehouse, space, other_space = sys.argv[1:5]
w = WorkspaceClient(host=host, token=os.environ["SDK_TOKEN"], auth_type="pat")
out = {}

TERMINAL = {StatementState.SUCCEEDED, StatementState.FAILED, StatementState.CANCELED, StatementState.CLOSED}


def error(e):
    return {"error": type(e).__name__, "error_code": getattr(e, "error_code", None), "message": str(e)}


def attempt(name, fn):
    try:
        out[name] = fn()
    except (DatabricksError, OperationFailed) as e:
        out[name] = error(e)


def statement(resp):
    state = resp.status.state.value if resp.status and resp.status.state else None
    res = {"state": state, "statement_id": resp.statement_id}
    if resp.status and resp.status.error:
        res["error"] = resp.status.error.message
    if resp.result is not None:
        res["rows"] = resp.result.data_array or []
    if resp.manifest is not None and resp.manifest.schema is not None:
        res["columns"] = [c.name for c in resp.manifest.schema.columns or []]
    return res


def run(sql):
    resp = w.statement_execution.execute_statement(statement=sql, warehouse_id=warehouse, wait_timeout="30s")
    return statement(resp)


def poll_and_chunk():
    """Submit without waiting, poll to the end (bounded), then fetch chunk 0 by itself."""
    resp = w.statement_execution.execute_statement(
        statement="SELECT order_id FROM main.sales.orders ORDER BY order_id",
        warehouse_id=warehouse,
        wait_timeout="0s",
    )
    first = resp.status.state.value
    polls = 0
    deadline = time.time() + 30
    while resp.status.state not in TERMINAL and time.time() < deadline:
        time.sleep(0.05)
        polls += 1
        resp = w.statement_execution.get_statement(resp.statement_id)
    chunk = w.statement_execution.get_statement_result_chunk_n(resp.statement_id, 0)
    return {"first_state": first, "final": statement(resp), "chunk_rows": chunk.data_array or []}


def cancel():
    resp = w.statement_execution.execute_statement(
        statement="WITH RECURSIVE r(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM r) SELECT count(*) FROM r",
        warehouse_id=warehouse,
        wait_timeout="0s",
    )
    w.statement_execution.cancel_execution(resp.statement_id)
    deadline = time.time() + 30
    while time.time() < deadline:
        resp = w.statement_execution.get_statement(resp.statement_id)
        if resp.status.state in TERMINAL:
            break
        time.sleep(0.05)
    return resp.status.state.value


def uc():
    catalogs = sorted(c.name for c in w.catalogs.list())
    schemas = {c: sorted(s.full_name for s in w.schemas.list(catalog_name=c)) for c in catalogs}
    tables = {}
    for cat, names in schemas.items():
        for full in names:
            try:
                _, sch = full.split(".", 1)
                tables[full] = sorted(
                    f"{t.full_name}:{t.table_type.value}" for t in w.tables.list(catalog_name=cat, schema_name=sch)
                )
            except DatabricksError as e:
                tables[full] = error(e)
    return {"catalogs": catalogs, "schemas": schemas, "tables": tables}


def effective():
    eff = w.grants.get_effective("table", "main.sales.orders")
    return sorted(
        f"{a.principal}:{p.privilege.value}:{p.inherited_from_name or ''}"
        for a in eff.privilege_assignments or []
        for p in a.privileges or []
    )


def genie(space_id):
    waiter = w.genie.start_conversation(space_id=space_id, content="How many orders per region?")
    conv, msg = waiter.response.conversation_id, waiter.response.message_id
    try:
        message = waiter.result()
    except OperationFailed:
        message = w.genie.get_message(space_id, conv, msg)
    res = {"status": message.status.value, "queries": []}
    if message.error:
        res["error"] = message.error.error
    for a in message.attachments or []:
        if a.query:
            qr = w.genie.get_message_attachment_query_result(space_id, conv, msg, a.attachment_id)
            res["queries"].append({"sql": a.query.query, "result": statement(qr.statement_response)})
    return res


def workspace():
    def listing(path):
        try:
            return sorted(o.path for o in w.workspace.list(path))
        except DatabricksError as e:
            return error(e)

    def status(path):
        try:
            return w.workspace.get_status(path).object_type.value
        except DatabricksError as e:
            return error(e)

    return {
        "users_dir": listing("/Users"),
        "alice_home": listing("/Users/alice@example.com"),
        "shared": listing("/Shared"),
        "alice_private": status("/Users/alice@example.com/private_notes"),
        "alice_shared": status("/Users/alice@example.com/churn_analysis"),
    }


attempt("me", lambda: {"user_name": w.current_user.me().user_name})
attempt("orders", lambda: run("SELECT order_id, region, customer_email FROM main.sales.orders ORDER BY order_id"))
attempt("view", lambda: run("SELECT region, orders FROM main.sales.region_totals ORDER BY region"))
attempt("federated", lambda: run("SELECT event_id, user_email FROM snowflake_fed.analytics.web_events ORDER BY event_id"))
attempt("hr", lambda: run("SELECT employee FROM main.hr.salaries ORDER BY employee"))
attempt("poll", poll_and_chunk)
attempt("cancel", cancel)
attempt("uc", uc)
attempt("effective", effective)
attempt("genie", lambda: genie(space))
attempt("genie_other", lambda: genie(other_space))
attempt("workspace", workspace)
print(json.dumps(out))
