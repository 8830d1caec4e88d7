//! The SQL engine behind the Statement Execution API.
//!
//! A statement runs in four steps, and Unity Catalog decides in the middle two, as in Databricks:
//!
//! 1. parse with the Databricks dialect (one query: `SELECT`, `WITH`, `VALUES`);
//! 2. resolve every table reference (three-part, or relative to the request's catalog and schema)
//!    and check `USE CATALOG`, `USE SCHEMA` and `SELECT` for the caller and their groups;
//! 3. rewrite each reference into a subquery that applies the table's row filter and column masks
//!    for the caller, over a physical table with a random name;
//! 4. execute in a fresh in-memory SQLite database that holds only the referenced tables, with an
//!    authorizer that allows nothing but reads of those tables, so SQL that escaped the rewrite
//!    cannot reach unfiltered data or SQLite internals.
//!
//! Errors carry the Databricks error class, message text and SQLSTATE.

use std::collections::HashSet;
use std::ops::ControlFlow;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use rusqlite::functions::FunctionFlags;
use rusqlite::hooks::{AuthAction, AuthContext, Authorization};
use rusqlite::types::ValueRef;
use rusqlite::Connection;
use sqlparser::ast::{
    ObjectName, ObjectNamePart, Query, Statement, TableAlias, TableFactor, VisitMut, VisitorMut,
};
use sqlparser::dialect::DatabricksDialect;
use sqlparser::parser::Parser;

use crate::fixture::{DataType, Fixture, Principal, Privilege, Securable, Table, Value};

/// Upper bound on rows a result holds; more sets `truncated`.
pub const MAX_RESULT_ROWS: usize = 100_000;
/// How many SQLite VM steps run between checks of the stop flag and the deadline.
const PROGRESS_STEPS: i32 = 10_000;
/// Upper bound on any string or blob a statement produces (SQLITE_LIMIT_LENGTH).
const MAX_VALUE_BYTES: i32 = 16 * 1024 * 1024;

/// A named parameter of the Statement Execution API.
#[derive(Clone, Debug, serde::Deserialize)]
pub struct Param {
    pub name: String,
    #[serde(rename = "type")]
    pub type_: Option<String>,
    pub value: Option<String>,
}

/// What to run and in which context.
#[derive(Clone, Debug)]
pub struct Request {
    pub sql: String,
    pub catalog: String,
    pub schema: String,
    pub params: Vec<Param>,
    pub row_limit: Option<usize>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OutColumn {
    pub name: String,
    pub type_text: String,
    pub type_name: String,
}

#[derive(Clone, Debug)]
pub struct ResultSet {
    pub columns: Vec<OutColumn>,
    /// Values rendered as the JSON_ARRAY format renders them: strings, or null.
    pub rows: Vec<Vec<Option<String>>>,
    pub truncated: bool,
}

/// A statement failure as Databricks reports it in `status.error` and `status.sql_state`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SqlError {
    /// The `ServiceErrorCode`; analysis and permission errors are `BAD_REQUEST`.
    pub error_code: &'static str,
    pub message: String,
    pub sql_state: &'static str,
}

impl SqlError {
    fn new(message: String, sql_state: &'static str) -> SqlError {
        SqlError {
            error_code: "BAD_REQUEST",
            message,
            sql_state,
        }
    }
}

#[derive(Debug)]
pub enum ExecError {
    Sql(SqlError),
    /// The statement was interrupted (cancel or timeout) while running.
    Interrupted,
}

impl From<SqlError> for ExecError {
    fn from(e: SqlError) -> Self {
        ExecError::Sql(e)
    }
}

/// Runs `req` as `who`, giving up (with [`ExecError::Interrupted`]) as soon as `stop` turns true
/// or `deadline` passes, checked every few thousand SQLite VM steps. Blocking: call from
/// `spawn_blocking`.
pub fn execute(
    fixture: &Fixture,
    who: &Principal,
    req: &Request,
    stop: Arc<AtomicBool>,
    deadline: Instant,
) -> Result<ResultSet, ExecError> {
    let prefix = format!("__sbx_{}_", crate::util::random_hex(6));
    let plan = plan(fixture, who, req, &prefix)?;
    let mut conn = Connection::open_in_memory().map_err(internal)?;
    conn.progress_handler(
        PROGRESS_STEPS,
        Some(move || stop.load(Ordering::Relaxed) || Instant::now() >= deadline),
    )
    .map_err(internal)?;
    conn.set_limit(
        rusqlite::limits::Limit::SQLITE_LIMIT_LENGTH,
        MAX_VALUE_BYTES,
    )
    .map_err(internal)?;
    register_functions(&conn, who).map_err(internal)?;
    for (physical, table) in &plan.loads {
        load_table(&conn, physical, table).map_err(internal)?;
    }
    install_authorizer(&mut conn, prefix, plan.ctes).map_err(internal)?;
    run(&conn, &plan.sql, req)
}

// === Plan: parse, resolve, authorize, rewrite ===

struct Plan<'f> {
    sql: String,
    loads: Vec<(String, &'f Table)>,
    /// Names the statement's WITH clauses define (lower-case).
    ctes: HashSet<String>,
}

fn plan<'f>(
    fixture: &'f Fixture,
    who: &Principal,
    req: &Request,
    prefix: &str,
) -> Result<Plan<'f>, SqlError> {
    let dialect = DatabricksDialect {};
    let mut statements =
        Parser::parse_sql(&dialect, &req.sql).map_err(|e| parse_error(&req.sql, &e))?;
    if statements.is_empty() {
        return Err(SqlError::new(
            "[PARSE_EMPTY_STATEMENT] Syntax error, unexpected empty statement. SQLSTATE: 42617"
                .into(),
            "42617",
        ));
    }
    if statements.len() > 1 {
        return Err(SqlError::new(
            "[PARSE_SYNTAX_ERROR] Syntax error at or near ';'. SQLSTATE: 42601 \
             (the Statement Execution API runs exactly one statement)"
                .into(),
            "42601",
        ));
    }
    let mut statement = statements.remove(0);
    if !matches!(statement, Statement::Query(_)) {
        return Err(SqlError::new(
            format!(
                "[UNSUPPORTED_FEATURE.SANDBOX] The sandbox workspace runs queries only \
                 (SELECT, WITH, VALUES); this statement is not supported: {}. SQLSTATE: 0A000",
                first_words(&req.sql)
            ),
            "0A000",
        ));
    }
    let mut rewriter = Rewriter {
        fixture,
        who,
        catalog: &req.catalog,
        schema: &req.schema,
        prefix,
        ctes: HashSet::new(),
        loads: Vec::new(),
        depth: 0,
    };
    if let ControlFlow::Break(e) = statement.visit(&mut rewriter) {
        return Err(e);
    }
    Ok(Plan {
        sql: statement.to_string(),
        loads: rewriter.loads,
        ctes: rewriter.ctes,
    })
}

struct Rewriter<'a, 'f> {
    fixture: &'f Fixture,
    who: &'a Principal,
    catalog: &'a str,
    schema: &'a str,
    prefix: &'a str,
    /// Names introduced by WITH clauses anywhere in the statement (lower-case).
    ctes: HashSet<String>,
    loads: Vec<(String, &'f Table)>,
    /// How many views deep this rewriter is.
    depth: usize,
}

/// Views over views deeper than this are refused (no view may reference itself either).
const MAX_VIEW_DEPTH: usize = 8;

impl VisitorMut for Rewriter<'_, '_> {
    type Break = SqlError;

    fn pre_visit_query(&mut self, query: &mut Query) -> ControlFlow<SqlError> {
        if let Some(with) = &query.with {
            for cte in &with.cte_tables {
                self.ctes.insert(cte.alias.name.value.to_lowercase());
            }
        }
        ControlFlow::Continue(())
    }

    fn post_visit_table_factor(&mut self, factor: &mut TableFactor) -> ControlFlow<SqlError> {
        match factor {
            TableFactor::Table {
                name, alias, args, ..
            } => {
                if args.is_some() {
                    return ControlFlow::Break(routine_not_found(name));
                }
                if self.is_cte(name) {
                    return ControlFlow::Continue(());
                }
                match self.replace(name, alias.take()) {
                    Ok(new) => *factor = new,
                    Err(e) => return ControlFlow::Break(e),
                }
                ControlFlow::Continue(())
            }
            TableFactor::Derived { .. } | TableFactor::NestedJoin { .. } => {
                ControlFlow::Continue(())
            }
            other => ControlFlow::Break(SqlError::new(
                format!(
                    "[UNSUPPORTED_FEATURE.SANDBOX] The sandbox workspace does not support this \
                     table expression: {other}. SQLSTATE: 0A000"
                ),
                "0A000",
            )),
        }
    }
}

impl<'f> Rewriter<'_, 'f> {
    fn is_cte(&self, name: &ObjectName) -> bool {
        match name.0.as_slice() {
            [ObjectNamePart::Identifier(id)] => self.ctes.contains(&id.value.to_lowercase()),
            _ => false,
        }
    }

    /// Resolves, authorizes and rewrites one table reference.
    fn replace(
        &mut self,
        name: &ObjectName,
        alias: Option<TableAlias>,
    ) -> Result<TableFactor, SqlError> {
        let parts: Vec<&sqlparser::ast::Ident> =
            name.0.iter().filter_map(ObjectNamePart::as_ident).collect();
        if parts.len() != name.0.len() || parts.is_empty() || parts.len() > 3 {
            return Err(not_found(name));
        }
        let (catalog, schema, table) = match parts.as_slice() {
            [t] => (self.catalog, self.schema, t.value.as_str()),
            [s, t] => (self.catalog, s.value.as_str(), t.value.as_str()),
            [c, s, t] => (c.value.as_str(), s.value.as_str(), t.value.as_str()),
            _ => return Err(not_found(name)),
        };
        let Some(table) = self.fixture.table(catalog, schema, table) else {
            return Err(not_found(name));
        };
        authorize(self.fixture, self.who, table)?;
        let alias = alias.unwrap_or_else(|| TableAlias {
            explicit: true,
            name: parts[parts.len() - 1].clone(),
            columns: vec![],
            at: None,
        });
        if let Some(definition) = &table.view_definition {
            let subquery = self.expand_view(table, definition)?;
            return Ok(TableFactor::Derived {
                lateral: false,
                subquery: Box::new(subquery),
                alias: Some(alias),
                sample: None,
            });
        }

        let physical = match self.loads.iter().find(|(_, t)| std::ptr::eq(*t, table)) {
            Some((p, _)) => p.clone(),
            None => {
                let p = format!("{}{}", self.prefix, self.loads.len());
                self.loads.push((p.clone(), table));
                p
            }
        };
        let subquery = secured_view(table, &physical)?;
        Ok(TableFactor::Derived {
            lateral: false,
            subquery: Box::new(subquery),
            alias: Some(alias),
            sample: None,
        })
    }
}

impl<'f> Rewriter<'_, 'f> {
    /// A view's query, with its references resolved relative to the view's schema and
    /// authorized against the view's owner. The engine's `current_user()` and group functions
    /// still answer for the caller, so row filters and masks apply to the caller.
    fn expand_view(&mut self, view: &Table, definition: &str) -> Result<Query, SqlError> {
        if self.depth >= MAX_VIEW_DEPTH {
            return Err(internal_sql(format!(
                "the view {} is nested too deeply",
                view.full_name()
            )));
        }
        let mut parsed = Parser::parse_sql(&DatabricksDialect {}, definition).map_err(|e| {
            internal_sql(format!("the view {} does not parse: {e}", view.full_name()))
        })?;
        let mut query = match parsed.pop() {
            Some(Statement::Query(q)) if parsed.is_empty() => q,
            _ => {
                return Err(internal_sql(format!(
                    "the view {} is not a query",
                    view.full_name()
                )))
            }
        };
        let owner = Principal {
            user_name: view.owner.clone(),
            groups: vec![view.owner.clone()],
        };
        let mut nested = Rewriter {
            fixture: self.fixture,
            who: &owner,
            catalog: &view.catalog,
            schema: &view.schema,
            prefix: self.prefix,
            ctes: HashSet::new(),
            loads: std::mem::take(&mut self.loads),
            depth: self.depth + 1,
        };
        let outcome = query.visit(&mut nested);
        self.loads = nested.loads;
        self.ctes.extend(nested.ctes);
        match outcome {
            ControlFlow::Break(e) => Err(e),
            ControlFlow::Continue(()) => Ok(*query),
        }
    }
}

fn position(name: &ObjectName) -> String {
    match name.0.first().and_then(ObjectNamePart::as_ident) {
        Some(id) if id.span.start.line > 0 => format!(
            "; line {} pos {}",
            id.span.start.line,
            id.span.start.column.saturating_sub(1)
        ),
        _ => String::new(),
    }
}

fn not_found(name: &ObjectName) -> SqlError {
    let quoted: Vec<String> = name
        .0
        .iter()
        .map(|p| match p.as_ident() {
            Some(id) => format!("`{}`", id.value),
            None => format!("`{p}`"),
        })
        .collect();
    SqlError::new(
        format!(
            "[TABLE_OR_VIEW_NOT_FOUND] The table or view {} cannot be found. Verify the \
             spelling and correctness of the schema and catalog.\nIf you did not qualify the \
             name with a schema, verify the current_schema() output, or qualify the name with \
             the correct schema and catalog.\nTo tolerate the error on drop use DROP VIEW IF \
             EXISTS or DROP TABLE IF EXISTS. SQLSTATE: 42P01{}",
            quoted.join("."),
            position(name)
        ),
        "42P01",
    )
}

fn routine_not_found(name: &ObjectName) -> SqlError {
    SqlError::new(
        format!(
            "[UNRESOLVABLE_TABLE_VALUED_FUNCTION] Could not resolve `{name}` to a table-valued \
             function. Please make sure that `{name}` is defined as a table-valued function and \
             that all required parameters are provided correctly. SQLSTATE: 42883{}",
            position(name)
        ),
        "42883",
    )
}

/// Checks `USE CATALOG`, `USE SCHEMA` and `SELECT`, in the order Databricks reports them.
pub fn authorize(fixture: &Fixture, who: &Principal, table: &Table) -> Result<(), SqlError> {
    let checks = [
        (
            Securable::Catalog(table.catalog.clone()),
            Privilege::UseCatalog,
        ),
        (
            Securable::Schema(table.catalog.clone(), table.schema.clone()),
            Privilege::UseSchema,
        ),
        (
            Securable::Table(
                table.catalog.clone(),
                table.schema.clone(),
                table.name.clone(),
            ),
            Privilege::Select,
        ),
    ];
    for (securable, privilege) in checks {
        if !fixture.has_privilege(who, &securable, privilege) {
            return Err(insufficient_privileges(privilege, &securable));
        }
    }
    Ok(())
}

pub fn insufficient_privileges(privilege: Privilege, securable: &Securable) -> SqlError {
    SqlError::new(
        format!(
            "[INSUFFICIENT_PERMISSIONS] Insufficient privileges:\nUser does not have {} on {} \
             '{}'. SQLSTATE: 42501",
            privilege.as_str(),
            securable.kind(),
            securable
        ),
        "42501",
    )
}

fn quote(ident: &str) -> String {
    format!("`{}`", ident.replace('`', "``"))
}

/// The subquery that stands in for `table`: its columns with masks applied, rows that pass the
/// row filter, read from the physical copy.
fn secured_view(table: &Table, physical: &str) -> Result<Query, SqlError> {
    let columns: Vec<String> = table
        .columns
        .iter()
        .map(|c| match table.mask_for(&c.name) {
            Some(mask) => format!("({}) AS {}", mask.expr, quote(&c.name)),
            None => quote(&c.name),
        })
        .collect();
    let filter = table
        .row_filter
        .as_ref()
        .map(|f| format!(" WHERE ({})", f.expr))
        .unwrap_or_default();
    let sql = format!(
        "SELECT {} FROM {}{}",
        columns.join(", "),
        quote(physical),
        filter
    );
    let mut parsed = Parser::parse_sql(&DatabricksDialect {}, &sql).map_err(|e| {
        internal_sql(format!(
            "the policy of {} does not parse: {e}",
            table.full_name()
        ))
    })?;
    match parsed.pop() {
        Some(Statement::Query(q)) if parsed.is_empty() => Ok(*q),
        _ => Err(internal_sql(format!(
            "the policy of {} is not a query",
            table.full_name()
        ))),
    }
}

fn first_words(sql: &str) -> String {
    sql.split_whitespace()
        .take(2)
        .collect::<Vec<_>>()
        .join(" ")
        .to_uppercase()
}

/// Turns a sqlparser error into Databricks' PARSE_SYNTAX_ERROR, with the offending token and
/// position when the parser reported them.
fn parse_error(sql: &str, e: &sqlparser::parser::ParserError) -> SqlError {
    let text = e.to_string();
    let token = text
        .split_once("found: ")
        .map(|(_, rest)| {
            rest.split(" at Line:")
                .next()
                .unwrap_or(rest)
                .trim()
                .to_string()
        })
        .filter(|t| !t.is_empty() && t != "EOF")
        .unwrap_or_else(|| "end of input".to_string());
    let position = text.split_once("at Line: ").and_then(|(_, rest)| {
        let (line, col) = rest.split_once(", Column: ")?;
        let line: usize = line.trim().parse().ok()?;
        let col: usize = col
            .trim()
            .trim_end_matches(|c: char| !c.is_ascii_digit())
            .parse()
            .ok()?;
        Some((line, col.saturating_sub(1)))
    });
    let mut message =
        format!("[PARSE_SYNTAX_ERROR] Syntax error at or near '{token}'. SQLSTATE: 42601");
    if let Some((line, pos)) = position {
        message.push_str(&format!(" (line {line}, pos {pos})\n\n== SQL ==\n"));
        for (i, l) in sql.lines().enumerate() {
            message.push_str(l);
            message.push('\n');
            if i + 1 == line {
                message.push_str(&"-".repeat(pos));
                message.push_str("^^^\n");
            }
        }
    }
    SqlError::new(message, "42601")
}

fn internal_sql(detail: String) -> SqlError {
    SqlError {
        error_code: "INTERNAL_ERROR",
        message: format!("[INTERNAL_ERROR] {detail}. SQLSTATE: XX000"),
        sql_state: "XX000",
    }
}

fn internal(e: rusqlite::Error) -> ExecError {
    ExecError::Sql(internal_sql(format!("the sandbox SQL engine failed: {e}")))
}

// === Execution in SQLite ===

fn register_functions(conn: &Connection, who: &Principal) -> rusqlite::Result<()> {
    let flags = FunctionFlags::SQLITE_UTF8 | FunctionFlags::SQLITE_DETERMINISTIC;
    for name in ["current_user", "session_user", "user"] {
        let user = who.user_name.clone();
        conn.create_scalar_function(name, 0, flags, move |_| Ok(user.clone()))?;
    }
    for name in ["is_account_group_member", "is_member"] {
        let who = who.clone();
        conn.create_scalar_function(name, 1, flags, move |ctx| {
            let group: String = ctx.get(0)?;
            Ok(who.is_member(&group))
        })?;
    }
    Ok(())
}

fn load_table(conn: &Connection, physical: &str, table: &Table) -> rusqlite::Result<()> {
    let columns: Vec<String> = table
        .columns
        .iter()
        .map(|c| format!("{} {}", quote(&c.name), c.data_type.sqlite_decl()))
        .collect();
    conn.execute_batch(&format!(
        "CREATE TABLE {} ({})",
        quote(physical),
        columns.join(", ")
    ))?;
    let placeholders = vec!["?"; table.columns.len()].join(", ");
    let mut insert = conn.prepare(&format!(
        "INSERT INTO {} VALUES ({placeholders})",
        quote(physical)
    ))?;
    for row in &table.rows {
        let values: Vec<rusqlite::types::Value> = row
            .iter()
            .map(|v| match v {
                Value::Null => rusqlite::types::Value::Null,
                Value::Bool(b) => rusqlite::types::Value::Integer(i64::from(*b)),
                Value::Int(i) => rusqlite::types::Value::Integer(*i),
                Value::Double(d) => rusqlite::types::Value::Real(*d),
                Value::Str(s) => rusqlite::types::Value::Text(s.clone()),
            })
            .collect();
        insert.execute(rusqlite::params_from_iter(values))?;
    }
    Ok(())
}

/// From here on the connection may only read the tables this statement loaded and its own CTEs.
/// A CTE name never grants access to a real table: the only real tables are the loaded ones
/// (random names) and SQLite's own `sqlite_*` tables, which are never readable.
fn install_authorizer(
    conn: &mut Connection,
    prefix: String,
    ctes: HashSet<String>,
) -> rusqlite::Result<()> {
    conn.authorizer(Some(move |ctx: AuthContext<'_>| match ctx.action {
        AuthAction::Select | AuthAction::Recursive => Authorization::Allow,
        AuthAction::Read { table_name, .. } if table_name.starts_with(&prefix) => {
            Authorization::Allow
        }
        AuthAction::Read { table_name, .. }
            if ctes.contains(&table_name.to_lowercase())
                && !table_name.to_lowercase().starts_with("sqlite_")
                && !table_name.starts_with("__sbx_") =>
        {
            Authorization::Allow
        }
        AuthAction::Function { function_name } => {
            if function_name.eq_ignore_ascii_case("load_extension") {
                Authorization::Deny
            } else {
                Authorization::Allow
            }
        }
        other => {
            tracing::debug!(action = ?other, "sandbox SQL authorizer denied an action");
            Authorization::Deny
        }
    }))
}

enum Cell {
    Null,
    Int(i64),
    Real(f64),
    Text(String),
    Blob(Vec<u8>),
}

fn run(conn: &Connection, sql: &str, req: &Request) -> Result<ResultSet, ExecError> {
    let mut stmt = conn.prepare(sql).map_err(sqlite_error)?;
    bind_params(&mut stmt, &req.params)?;
    let names: Vec<String> = stmt.column_names().map(|s| s.to_string()).collect();
    let declared: Vec<Option<DataType>> = stmt
        .columns()
        .map(|c| c.decl_type().and_then(DataType::from_sqlite_decl))
        .collect();
    let limit = req
        .row_limit
        .unwrap_or(MAX_RESULT_ROWS)
        .min(MAX_RESULT_ROWS);
    let mut rows: Vec<Vec<Cell>> = Vec::new();
    let mut truncated = false;
    let mut cursor = stmt.raw_query();
    while let Some(row) = cursor.next().map_err(sqlite_error)? {
        if rows.len() == limit {
            truncated = true;
            break;
        }
        let mut cells = Vec::with_capacity(names.len());
        for i in 0..names.len() {
            let cell = match row.get_ref(i).map_err(sqlite_error)? {
                ValueRef::Null => Cell::Null,
                ValueRef::Integer(v) => Cell::Int(v),
                ValueRef::Real(v) => Cell::Real(v),
                ValueRef::Text(t) => Cell::Text(String::from_utf8_lossy(t).into_owned()),
                ValueRef::Blob(b) => Cell::Blob(b.to_vec()),
            };
            cells.push(cell);
        }
        rows.push(cells);
    }

    let types: Vec<Option<DataType>> = (0..names.len())
        .map(|i| declared[i].or_else(|| infer_type(rows.iter().map(|r| &r[i]))))
        .collect();
    let columns = names
        .iter()
        .zip(&types)
        .enumerate()
        .map(|(i, (name, ty))| {
            let (text, tname) = match ty {
                Some(t) => (t.type_text(), t.type_name()),
                None => match rows
                    .iter()
                    .map(|r| &r[i])
                    .find(|c| !matches!(c, Cell::Null))
                {
                    Some(Cell::Blob(_)) => ("BINARY", "BINARY"),
                    _ => ("VOID", "NULL"),
                },
            };
            OutColumn {
                name: name.clone(),
                type_text: text.to_string(),
                type_name: tname.to_string(),
            }
        })
        .collect();
    let rows = rows
        .into_iter()
        .map(|r| {
            r.into_iter()
                .zip(&types)
                .map(|(cell, ty)| render(cell, *ty))
                .collect()
        })
        .collect();
    Ok(ResultSet {
        columns,
        rows,
        truncated,
    })
}

/// The type of a computed column, from the values it produced.
fn infer_type<'a>(mut cells: impl Iterator<Item = &'a Cell>) -> Option<DataType> {
    cells.find_map(|c| match c {
        Cell::Int(_) => Some(DataType::BigInt),
        Cell::Real(_) => Some(DataType::Double),
        Cell::Text(_) => Some(DataType::String),
        Cell::Null | Cell::Blob(_) => None,
    })
}

/// Renders a value as the JSON_ARRAY format does: the SQL string representation, or null.
fn render(cell: Cell, ty: Option<DataType>) -> Option<String> {
    use base64::Engine as _;
    Some(match (cell, ty) {
        (Cell::Null, _) => return None,
        (Cell::Int(v), Some(DataType::Boolean)) => (v != 0).to_string(),
        (Cell::Int(v), Some(DataType::Double)) => java_double(v as f64),
        (Cell::Int(v), _) => v.to_string(),
        (Cell::Real(v), Some(DataType::Int | DataType::BigInt)) if v.fract() == 0.0 => {
            format!("{}", v as i64)
        }
        (Cell::Real(v), _) => java_double(v),
        (Cell::Text(s), _) => s,
        (Cell::Blob(b), _) => base64::engine::general_purpose::STANDARD.encode(b),
    })
}

/// Formats a double the way Spark (Java's `Double.toString`) does: `75.0`, `120.5`, `1.0E7`.
pub fn java_double(v: f64) -> String {
    if v.is_nan() {
        return "NaN".into();
    }
    if v.is_infinite() {
        return if v > 0.0 { "Infinity" } else { "-Infinity" }.into();
    }
    if v == 0.0 {
        return if v.is_sign_negative() { "-0.0" } else { "0.0" }.into();
    }
    let a = v.abs();
    if (1e-3..1e7).contains(&a) {
        let s = format!("{v}");
        if s.contains('.') {
            s
        } else {
            format!("{s}.0")
        }
    } else {
        let s = format!("{v:E}");
        match s.split_once('E') {
            Some((m, e)) if !m.contains('.') => format!("{m}.0E{e}"),
            _ => s,
        }
    }
}

fn bind_params(stmt: &mut rusqlite::Statement<'_>, params: &[Param]) -> Result<(), ExecError> {
    for index in 1..=stmt.parameter_count() {
        let marker = stmt.parameter_name(index).map(|s| s.to_string());
        let name = marker
            .as_deref()
            .and_then(|m| m.strip_prefix(':').or_else(|| m.strip_prefix('@')))
            .unwrap_or("?")
            .to_string();
        let Some(param) = params.iter().find(|p| p.name.eq_ignore_ascii_case(&name)) else {
            return Err(SqlError::new(
                format!(
                    "[UNBOUND_SQL_PARAMETER] Found the unbound parameter: {name}. Please, fix \
                     `args` and provide a mapping of the parameter to either a SQL literal or \
                     collection constructor functions such as `map()`, `array()`, `struct()`. \
                     SQLSTATE: 42P02"
                ),
                "42P02",
            )
            .into());
        };
        let value = param_value(param)?;
        stmt.raw_bind_parameter(index, value)
            .map_err(sqlite_error)?;
    }
    Ok(())
}

fn param_value(p: &Param) -> Result<rusqlite::types::Value, SqlError> {
    use rusqlite::types::Value as V;
    let Some(raw) = &p.value else {
        return Ok(V::Null);
    };
    let ty = p
        .type_
        .as_deref()
        .unwrap_or("STRING")
        .trim()
        .to_ascii_uppercase();
    let base = ty.split('(').next().unwrap_or("").trim();
    let cast_error = || {
        SqlError::new(
            format!(
                "[CAST_INVALID_INPUT] The value '{raw}' of the type \"STRING\" cannot be cast to \
                 \"{ty}\" because it is malformed. Correct the value as per the syntax, or change \
                 its target type. SQLSTATE: 22018"
            ),
            "22018",
        )
    };
    Ok(match base {
        "INT" | "INTEGER" | "BIGINT" | "LONG" | "SMALLINT" | "SHORT" | "TINYINT" | "BYTE" => {
            V::Integer(raw.trim().parse().map_err(|_| cast_error())?)
        }
        "DOUBLE" | "FLOAT" | "REAL" | "DECIMAL" | "DEC" | "NUMERIC" => {
            V::Real(raw.trim().parse().map_err(|_| cast_error())?)
        }
        "BOOLEAN" => match raw.trim().to_ascii_lowercase().as_str() {
            "true" => V::Integer(1),
            "false" => V::Integer(0),
            _ => return Err(cast_error()),
        },
        _ => V::Text(raw.clone()),
    })
}

/// Maps a SQLite failure to the Databricks error class a user would see for the same mistake.
fn sqlite_error(e: rusqlite::Error) -> ExecError {
    let msg = match &e {
        rusqlite::Error::SqliteFailure(f, _)
            if f.code == rusqlite::ErrorCode::OperationInterrupted =>
        {
            return ExecError::Interrupted;
        }
        rusqlite::Error::SqliteFailure(_, Some(m)) => m.clone(),
        other => other.to_string(),
    };
    if let Some(col) = msg.strip_prefix("no such column: ") {
        return ExecError::Sql(SqlError::new(
            format!(
                "[UNRESOLVED_COLUMN.WITHOUT_SUGGESTION] A column, variable, or function parameter \
                 with name `{}` cannot be resolved. SQLSTATE: 42703",
                col.replace('.', "`.`")
            ),
            "42703",
        ));
    }
    if let Some(f) = msg.strip_prefix("no such function: ") {
        return ExecError::Sql(SqlError::new(
            format!(
                "[UNRESOLVED_ROUTINE] Cannot resolve routine `{f}` on search path \
                 [`system`.`builtin`, `system`.`session`]. SQLSTATE: 42883"
            ),
            "42883",
        ));
    }
    if msg.contains("not authorized") || msg.contains("prohibited") {
        return ExecError::Sql(SqlError::new(
            "[INSUFFICIENT_PERMISSIONS] Insufficient privileges:\nUser does not have permission \
             to access an object this statement references. SQLSTATE: 42501"
                .into(),
            "42501",
        ));
    }
    if msg.contains("misuse of aggregate") || msg.contains("GROUP BY") {
        return ExecError::Sql(SqlError::new(
            format!("[MISSING_AGGREGATION] {msg}. SQLSTATE: 42803"),
            "42803",
        ));
    }
    ExecError::Sql(SqlError::new(
        format!("[INVALID_QUERY.SANDBOX] The sandbox SQL engine rejected the query: {msg}. SQLSTATE: 42000"),
        "42000",
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(sql: &str) -> Request {
        Request {
            sql: sql.into(),
            catalog: "main".into(),
            schema: "default".into(),
            params: vec![],
            row_limit: None,
        }
    }

    fn run_as(user: &str, r: &Request) -> Result<ResultSet, SqlError> {
        let f = Fixture::standard();
        let u = f
            .user(&format!("{user}@example.com"))
            .expect("fixture user");
        let p = f.principal(u);
        let deadline = Instant::now() + std::time::Duration::from_secs(30);
        match execute(&f, &p, r, Arc::new(AtomicBool::new(false)), deadline) {
            Ok(rs) => Ok(rs),
            Err(ExecError::Sql(e)) => Err(e),
            Err(ExecError::Interrupted) => panic!("interrupted"),
        }
    }

    fn cells(rs: &ResultSet) -> Vec<Vec<String>> {
        rs.rows
            .iter()
            .map(|r| {
                r.iter()
                    .map(|c| c.clone().unwrap_or_else(|| "NULL".into()))
                    .collect()
            })
            .collect()
    }

    #[test]
    fn alice_sees_emea_rows_with_masked_emails() {
        let rs = run_as(
            "alice",
            &req("SELECT * FROM main.sales.orders ORDER BY order_id"),
        )
        .expect("query runs");
        assert_eq!(
            cells(&rs),
            vec![
                vec!["1", "EMEA", "***", "120.5"],
                vec!["2", "EMEA", "***", "75.0"],
                vec!["3", "EMEA", "***", "310.25"],
            ]
        );
        let types: Vec<(&str, &str)> = rs
            .columns
            .iter()
            .map(|c| (c.type_text.as_str(), c.type_name.as_str()))
            .collect();
        assert_eq!(
            types,
            vec![
                ("INT", "INT"),
                ("STRING", "STRING"),
                ("STRING", "STRING"),
                ("DOUBLE", "DOUBLE")
            ]
        );
    }

    #[test]
    fn user_predicates_see_masked_values_and_cannot_bypass_the_filter() {
        let rs = run_as(
            "alice",
            &req("SELECT count(*) AS n FROM main.sales.orders WHERE region = 'AMER' OR customer_email LIKE '%@example.com'"),
        )
        .expect("query runs");
        assert_eq!(cells(&rs), vec![vec!["0"]]);
        assert_eq!(rs.columns[0].type_text, "BIGINT");
        assert_eq!(rs.columns[0].type_name, "LONG");
    }

    #[test]
    fn carol_sees_everything_unmasked() {
        let rs = run_as(
            "carol",
            &req("SELECT o.region, count(*) AS n, sum(amount) AS total FROM sales.orders o GROUP BY o.region ORDER BY o.region"),
        )
        .expect("query runs");
        assert_eq!(
            cells(&rs),
            vec![
                vec!["AMER", "3", "1037.75"],
                vec!["APAC", "2", "648.8"],
                vec!["EMEA", "3", "505.75"],
            ]
        );
        let rs = run_as(
            "carol",
            &req("SELECT customer_email FROM main.sales.orders WHERE order_id = 4"),
        )
        .expect("query runs");
        assert_eq!(cells(&rs), vec![vec!["dave@example.com"]]);
    }

    #[test]
    fn bob_lacks_select() {
        let e = run_as("bob", &req("SELECT * FROM main.sales.orders")).expect_err("denied");
        assert_eq!(
            e.message,
            "[INSUFFICIENT_PERMISSIONS] Insufficient privileges:\nUser does not have SELECT on \
             Table 'main.sales.orders'. SQLSTATE: 42501"
        );
        assert_eq!(e.sql_state, "42501");
        assert_eq!(e.error_code, "BAD_REQUEST");
    }

    #[test]
    fn alice_lacks_use_schema_on_hr() {
        let e = run_as("alice", &req("SELECT * FROM main.hr.salaries")).expect_err("denied");
        assert!(
            e.message
                .contains("User does not have USE SCHEMA on Schema 'main.hr'."),
            "{}",
            e.message
        );
    }

    #[test]
    fn permission_is_checked_in_subqueries_ctes_and_joins() {
        for sql in [
            "SELECT (SELECT max(salary) FROM main.hr.salaries) AS m",
            "WITH x AS (SELECT * FROM main.hr.salaries) SELECT * FROM x",
            "SELECT * FROM main.sales.orders o JOIN main.hr.salaries s ON 1 = 1",
            "SELECT * FROM main.sales.orders WHERE order_id IN (SELECT 1 FROM main.hr.salaries)",
        ] {
            let e = run_as("alice", &req(sql)).expect_err(sql);
            assert!(
                e.message.contains("USE SCHEMA on Schema 'main.hr'"),
                "{sql}: {}",
                e.message
            );
        }
    }

    #[test]
    fn unknown_table_and_internals_are_not_found() {
        for sql in [
            "SELECT * FROM main.sales.nope",
            "SELECT * FROM sqlite_master",
            "SELECT * FROM main.sqlite_master",
            "SELECT * FROM temp.sqlite_master",
        ] {
            let e = run_as("carol", &req(sql)).expect_err(sql);
            assert!(
                e.message.starts_with("[TABLE_OR_VIEW_NOT_FOUND]"),
                "{sql}: {}",
                e.message
            );
            assert_eq!(e.sql_state, "42P01");
        }
        // A CTE name reused outside its scope must not reach SQLite's own tables.
        let escape = "SELECT * FROM (WITH sqlite_master AS (SELECT 1 AS x) SELECT x FROM sqlite_master) a, sqlite_master";
        assert!(run_as("carol", &req(escape)).is_err());
        let rs = run_as(
            "alice",
            &req("WITH t AS (SELECT * FROM main.sales.orders) SELECT count(*) FROM t"),
        )
        .expect("cte over a granted table");
        assert_eq!(cells(&rs), vec![vec!["3"]]);
        let e = run_as("carol", &req("SELECT * FROM main.sales.nope")).expect_err("missing");
        assert!(e.message.contains("`main`.`sales`.`nope`"), "{}", e.message);
        assert!(
            e.message.ends_with("SQLSTATE: 42P01; line 1 pos 14"),
            "{}",
            e.message
        );
        let e = run_as("carol", &req("SELECT * FROM pragma_table_info('x')")).expect_err("tvf");
        assert_eq!(e.sql_state, "42883");
    }

    #[test]
    fn only_queries_run() {
        for sql in [
            "DELETE FROM main.sales.orders",
            "DROP TABLE main.sales.orders",
            "ATTACH 'x' AS y",
        ] {
            let r = run_as("carol", &req(sql));
            assert!(r.is_err(), "{sql}");
        }
    }

    #[test]
    fn parameters_limits_and_functions() {
        let mut r =
            req("SELECT order_id FROM main.sales.orders WHERE amount > :min ORDER BY order_id");
        r.params = vec![Param {
            name: "min".into(),
            type_: Some("DOUBLE".into()),
            value: Some("300".into()),
        }];
        let rs = run_as("carol", &r).expect("query runs");
        assert_eq!(cells(&rs), vec![vec!["3"], vec!["5"], vec!["7"]]);

        r.params.clear();
        let e = run_as("carol", &r).expect_err("unbound");
        assert!(
            e.message.starts_with("[UNBOUND_SQL_PARAMETER]"),
            "{}",
            e.message
        );

        let mut r = req("SELECT order_id FROM main.sales.orders ORDER BY order_id");
        r.row_limit = Some(2);
        let rs = run_as("carol", &r).expect("query runs");
        assert_eq!(rs.rows.len(), 2);
        assert!(rs.truncated);

        let rs = run_as(
            "alice",
            &req("SELECT current_user() AS u, is_account_group_member('emea') AS m"),
        )
        .expect("query runs");
        assert_eq!(cells(&rs), vec![vec!["alice@example.com", "1"]]);
    }

    #[test]
    fn errors_look_like_databricks() {
        let e = run_as("carol", &req("SELECT * FORM main.sales.orders")).expect_err("syntax");
        assert!(
            e.message
                .starts_with("[PARSE_SYNTAX_ERROR] Syntax error at or near"),
            "{}",
            e.message
        );
        let e = run_as("carol", &req("SELECT nope FROM main.sales.orders")).expect_err("column");
        assert!(e.message.starts_with("[UNRESOLVED_COLUMN"), "{}", e.message);
        assert_eq!(e.sql_state, "42703");
    }

    #[test]
    fn common_query_shapes_run() {
        let cases: &[(&str, &str, Vec<Vec<&str>>)] = &[
            (
                "alice",
                "WITH emea AS (SELECT order_id, amount FROM main.sales.orders) \
                 SELECT count(*), round(avg(amount), 2) FROM emea",
                vec![vec!["3", "168.58"]],
            ),
            (
                "carol",
                "SELECT region FROM main.sales.orders UNION SELECT 'XX' ORDER BY 1 LIMIT 2",
                vec![vec!["AMER"], vec!["APAC"]],
            ),
            ("carol", "VALUES (1, 'a')", vec![vec!["1", "a"]]),
            (
                "carol",
                "WITH RECURSIVE r(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM r WHERE x < 2500) \
                 SELECT count(*), max(x) FROM r",
                vec![vec!["2500", "2500"]],
            ),
            (
                "alice",
                "SELECT `o`.order_id FROM `main`.`sales`.`orders` AS `o` WHERE o.amount > 100 ORDER BY 1 DESC",
                vec![vec!["3"], vec!["1"]],
            ),
        ];
        for (user, sql, want) in cases {
            let rs = run_as(user, &req(sql)).unwrap_or_else(|e| panic!("{sql}: {}", e.message));
            let want: Vec<Vec<String>> = want
                .iter()
                .map(|r| r.iter().map(|c| c.to_string()).collect())
                .collect();
            assert_eq!(cells(&rs), want, "{sql}");
        }
        let mut r = req("SELECT count(*) FROM orders");
        r.schema = "sales".into();
        let rs = run_as("alice", &r).expect("relative name resolves");
        assert_eq!(cells(&rs), vec![vec!["3"]]);
    }

    #[test]
    fn views_read_with_the_owners_rights_and_the_callers_filters() {
        let view = req("SELECT region, orders FROM main.sales.region_totals ORDER BY region");
        // bob has SELECT on the view only, and the orders row filter still applies to him.
        assert_eq!(
            cells(&run_as("bob", &view).unwrap()),
            vec![vec!["AMER", "3"]]
        );
        assert_eq!(run_as("carol", &view).unwrap().rows.len(), 3);
        let e = run_as("alice", &view).unwrap_err();
        assert!(
            e.message
                .contains("User does not have SELECT on Table 'main.sales.region_totals'"),
            "{}",
            e.message
        );
        // The view grants nothing on its table.
        assert!(run_as("bob", &req("SELECT * FROM main.sales.orders")).is_err());
        // Relative names and joins through the view resolve too.
        let joined = Request {
            schema: "sales".into(),
            ..req(
                "SELECT t.region FROM region_totals t JOIN region_totals u ON t.region = u.region",
            )
        };
        assert_eq!(cells(&run_as("bob", &joined).unwrap()), vec![vec!["AMER"]]);
    }

    #[test]
    fn the_federated_catalog_filters_per_user() {
        let q = req("SELECT event_id FROM snowflake_fed.analytics.web_events ORDER BY event_id");
        assert_eq!(
            cells(&run_as("alice", &q).unwrap()),
            vec![vec!["1"], vec!["2"], vec!["5"]]
        );
        assert_eq!(run_as("carol", &q).unwrap().rows.len(), 5);
        let e = run_as("bob", &q).unwrap_err();
        assert!(
            e.message.contains("USE CATALOG on Catalog 'snowflake_fed'"),
            "{}",
            e.message
        );
    }

    #[test]
    fn runaway_queries_stop_at_the_deadline() {
        let f = Fixture::standard();
        let p = f.principal(f.user("carol@example.com").expect("carol"));
        let endless = req("WITH RECURSIVE r(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM r) SELECT count(*) FROM r");
        let started = Instant::now();
        let deadline = started + std::time::Duration::from_millis(200);
        let r = execute(&f, &p, &endless, Arc::new(AtomicBool::new(false)), deadline);
        assert!(
            matches!(r, Err(ExecError::Interrupted)),
            "{:?}",
            r.map(|rs| rs.rows)
        );
        assert!(started.elapsed() < std::time::Duration::from_secs(5));
        let stopped = Arc::new(AtomicBool::new(true));
        let far = Instant::now() + std::time::Duration::from_secs(60);
        assert!(matches!(
            execute(&f, &p, &endless, stopped, far),
            Err(ExecError::Interrupted)
        ));
    }

    #[test]
    fn doubles_render_like_spark() {
        assert_eq!(java_double(75.0), "75.0");
        assert_eq!(java_double(120.5), "120.5");
        assert_eq!(java_double(1e7), "1.0E7");
        assert_eq!(java_double(1.5e-4), "1.5E-4");
        assert_eq!(java_double(0.0), "0.0");
    }
}
