"""Drives the official databricks-sql-connector (and the databricks-sqlalchemy dialect) through
Envoy's TLS listener, and so through aegis, to the SQL warehouse endpoint, as one user.

Usage: SQL_TOKEN=<IdP JWT> sql_connector.py <mode> <host:port> <http path> <CA file> [args]

Modes (each prints one JSON object on stdout; tests/sql_endpoint.rs asserts on it):
  surfaces             queries, a parameter, the metadata calls, a SQLAlchemy engine
  long_session <secs>  one session: a query, a pause of <secs>, the same query again
  statements           runs each statement of the JSON list on stdin on one connection
  cross_user           opens a session with SQL_TOKEN, then calls on it with OTHER_TOKEN
                       (raw TCLIService over THttpClient: the connector has one token per
                       connection)

The token is read from the environment so it never appears on a command line.
"""

import json
import os
import ssl
import sys
import time

from databricks import sql
from databricks.sql.exc import Error as DbError

mode, server, http_path, ca_file = sys.argv[1:5]
token = os.environ["SQL_TOKEN"]
# Databricks is always on port 443, and the connector sends its feature-flag and telemetry
# requests to port 443 of server_hostname whatever `_port` says; the harness binds Envoy's TLS
# listener to 443 on a loopback address of its own, so `_port` is only a fallback.
host, _, port = server.rpartition(":")
PORT = {} if port == "443" else {"_port": int(port)}
# Bounded: one request, one attempt per retryable answer, never the connector's 900 s default.
RETRY = {"_retry_stop_after_attempts_count": 2, "_retry_stop_after_attempts_duration": 10}


def connect(**extra):
    return sql.connect(
        server_hostname=host,
        http_path=http_path,
        **PORT,
        access_token=token,
        _tls_trusted_ca_file=ca_file,
        user_agent_entry="sql-endpoint-test",
        **RETRY,
        **extra,
    )


def error(e):
    return {"error": type(e).__name__, "message": str(e)}


def fetch(cursor, statement, params=None):
    try:
        cursor.execute(statement, params)
        cols = [d[0] for d in cursor.description]
        types = [d[1] for d in cursor.description]
        rows = [[None if v is None else str(v) for v in r] for r in cursor.fetchall()]
        return {"columns": cols, "types": types, "rows": rows}
    except DbError as e:
        return error(e)


def listing(result_set_fn):
    try:
        rows = result_set_fn().fetchall()
        return [r.asDict() for r in rows]
    except DbError as e:
        return error(e)


def surfaces():
    out = {}
    with connect() as conn:
        out["session_id"] = conn.get_session_id_hex()
        with conn.cursor() as c:
            out["orders"] = fetch(c, "SELECT order_id, region, customer_email, amount FROM main.sales.orders ORDER BY order_id")
            out["salaries"] = fetch(c, "SELECT * FROM main.hr.salaries")
            out["region_totals"] = fetch(c, "SELECT region, orders FROM main.sales.region_totals ORDER BY region")
            out["param"] = fetch(c, "SELECT order_id FROM main.sales.orders WHERE region = :r ORDER BY order_id", {"r": "EMEA"})
            out["catalogs"] = [r["TABLE_CAT"] for r in listing(lambda: c.catalogs())]
            out["schemas"] = [
                "%s.%s" % (r["TABLE_CATALOG"], r["TABLE_SCHEM"]) for r in listing(lambda: c.schemas(catalog_name="main"))
            ]
            out["tables"] = [
                "%s.%s.%s:%s" % (r["TABLE_CAT"], r["TABLE_SCHEM"], r["TABLE_NAME"], r["TABLE_TYPE"])
                for r in listing(lambda: c.tables())
            ]
            out["columns"] = [
                "%s:%s" % (r["COLUMN_NAME"], r["TYPE_NAME"])
                for r in listing(lambda: c.columns(catalog_name="main", schema_name="sales", table_name="orders"))
            ]
    # LangChain's SQLDatabase reaches Databricks through this dialect.
    from sqlalchemy import create_engine, inspect, text

    engine = create_engine(
        "databricks://token:%s@%s?http_path=%s&catalog=main&schema=sales" % (token, host, http_path),
        connect_args={"_tls_trusted_ca_file": ca_file, "user_agent_entry": "sql-endpoint-test", **RETRY, **PORT},
    )
    try:
        with engine.connect() as conn:
            rows = conn.execute(
                text("SELECT region, count(*) AS n FROM main.sales.orders GROUP BY region ORDER BY region")
            ).fetchall()
            out["sqlalchemy"] = {"rows": [[str(v) for v in r] for r in rows]}
    except Exception as e:  # the dialect wraps DB-API errors in sqlalchemy.exc.DBAPIError
        out["sqlalchemy"] = error(e)
    try:
        cols = inspect(engine).get_columns("orders", schema="sales")
        out["sqlalchemy_columns"] = [c["name"] for c in cols]
    except Exception as e:
        out["sqlalchemy_columns"] = error(e)
    engine.dispose()
    return out


def long_session(pause):
    out = {}
    with connect() as conn:
        out["session_id"] = conn.get_session_id_hex()
        with conn.cursor() as c:
            out["before"] = fetch(c, "SELECT count(*) AS n FROM main.sales.orders")
            time.sleep(float(pause))
            out["after"] = fetch(c, "SELECT count(*) AS n FROM main.sales.orders")
        out["session_id_after"] = conn.get_session_id_hex()
    return out


def statements():
    out = {"results": []}
    with connect() as conn:
        with conn.cursor() as c:
            for s in json.load(sys.stdin):
                r = fetch(c, s)
                r["statement"] = s
                out["results"].append(r)
    return out


def cross_user():
    from thrift.protocol import TBinaryProtocol
    from thrift.transport import THttpClient

    from databricks.sql.thrift_api.TCLIService import TCLIService, ttypes

    url = "https://%s%s" % (server, http_path)
    ctx = ssl.create_default_context(cafile=ca_file)

    def client(bearer):
        t = THttpClient.THttpClient(url, ssl_context=ctx)
        t.setCustomHeaders({"Authorization": "Bearer " + bearer, "User-Agent": "sql-endpoint-test"})
        return TCLIService.Client(TBinaryProtocol.TBinaryProtocol(t))

    own = client(token)
    opened = own.OpenSession(
        ttypes.TOpenSessionReq(client_protocol_i64=ttypes.TProtocolVersion.SPARK_CLI_SERVICE_PROTOCOL_V7)
    )
    handle = opened.sessionHandle
    other = client(os.environ["OTHER_TOKEN"])
    stolen = other.ExecuteStatement(
        ttypes.TExecuteStatementReq(sessionHandle=handle, statement="SELECT 1 AS one", runAsync=True)
    )
    info = other.GetInfo(ttypes.TGetInfoReq(sessionHandle=handle, infoType=ttypes.TGetInfoType.CLI_DBMS_NAME))
    mine = own.GetInfo(ttypes.TGetInfoReq(sessionHandle=handle, infoType=ttypes.TGetInfoType.CLI_DBMS_NAME))
    own.CloseSession(ttypes.TCloseSessionReq(sessionHandle=handle))

    def status(s):
        return {"code": ttypes.TStatusCode._VALUES_TO_NAMES[s.statusCode], "message": s.errorMessage}

    return {
        "opened": status(opened.status),
        "stolen_execute": status(stolen.status),
        "stolen_get_info": status(info.status),
        "own_get_info": status(mine.status),
        "own_value": mine.infoValue.stringValue if mine.infoValue else None,
    }


if mode == "surfaces":
    result = surfaces()
elif mode == "long_session":
    result = long_session(sys.argv[5])
elif mode == "statements":
    result = statements()
elif mode == "cross_user":
    result = cross_user()
else:
    raise SystemExit("unknown mode " + mode)
print(json.dumps(result))
