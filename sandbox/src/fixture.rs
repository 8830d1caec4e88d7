//! The workspace fixture: the directory (users, groups), the Unity Catalog objects with their data,
//! grants, row filters and column masks, and the SQL warehouse.
//!
//! The model follows Unity Catalog: privileges are granted to a principal (a user name or a group
//! name) on a securable (catalog, schema, table) and are inherited downwards, so `SELECT` granted on
//! a catalog covers every table in it. Row filters and column masks belong to a table and are SQL
//! expressions over its columns that may call `current_user()` and `is_account_group_member()`,
//! the way Databricks row-filter and column-mask functions do; the SQL engine evaluates them for
//! the calling user. Views, other catalogs (e.g. a federated one) and further securable kinds are
//! added by extending [`Securable`] and the lists in [`Fixture::standard`].

use std::fmt;

/// The SQL warehouse every statement must name.
pub const WAREHOUSE_ID: &str = "abcdef0123456789";
/// The workspace id reported by `/.well-known/databricks-config`.
pub const WORKSPACE_ID: &str = "1234567890123456";
/// The account id reported by `/.well-known/databricks-config`.
pub const ACCOUNT_ID: &str = "0d2a1e6f-5c3b-4a7e-9f10-aa5b2c3d4e5f";
/// Every workspace user is implicitly a member of this group, as in Databricks.
pub const ALL_USERS_GROUP: &str = "users";

// === Directory ===

#[derive(Clone, Debug)]
pub struct User {
    pub id: String,
    pub user_name: String,
    pub given_name: String,
    pub family_name: String,
    /// Direct group memberships by group name.
    pub groups: Vec<String>,
}

impl User {
    pub fn display_name(&self) -> String {
        format!("{} {}", self.given_name, self.family_name)
    }
}

#[derive(Clone, Debug)]
pub struct Group {
    pub id: String,
    pub name: String,
}

/// The calling identity as the SQL engine and the grant checks see it.
#[derive(Clone, Debug)]
pub struct Principal {
    pub user_name: String,
    pub groups: Vec<String>,
}

impl Principal {
    pub fn is_member(&self, group: &str) -> bool {
        group.eq_ignore_ascii_case(ALL_USERS_GROUP)
            || self.groups.iter().any(|g| g.eq_ignore_ascii_case(group))
    }

    /// Whether a grant to `principal` (a user name or a group name) applies to this identity.
    pub fn matches(&self, principal: &str) -> bool {
        principal.eq_ignore_ascii_case(&self.user_name) || self.is_member(principal)
    }
}

// === Unity Catalog ===

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DataType {
    Boolean,
    Int,
    BigInt,
    Double,
    String,
    Date,
    Timestamp,
}

impl DataType {
    /// The SQL type text Databricks reports (`type_text`).
    pub fn type_text(self) -> &'static str {
        match self {
            DataType::Boolean => "BOOLEAN",
            DataType::Int => "INT",
            DataType::BigInt => "BIGINT",
            DataType::Double => "DOUBLE",
            DataType::String => "STRING",
            DataType::Date => "DATE",
            DataType::Timestamp => "TIMESTAMP",
        }
    }

    /// The base type name Databricks reports (`type_name`, the `ColumnInfoTypeName` enum).
    pub fn type_name(self) -> &'static str {
        match self {
            DataType::BigInt => "LONG",
            other => other.type_text(),
        }
    }

    /// The declared type of the column in the SQLite table that stores it. It keeps the
    /// Databricks type recoverable from `sqlite3_column_decltype` while giving SQLite the right
    /// affinity (a plain `STRING` would get NUMERIC affinity and turn '007' into 7).
    pub fn sqlite_decl(self) -> &'static str {
        match self {
            DataType::Boolean => "BOOLEAN",
            DataType::Int => "INT",
            DataType::BigInt => "BIGINT",
            DataType::Double => "DOUBLE",
            DataType::String => "STRING_TEXT",
            DataType::Date => "DATE_TEXT",
            DataType::Timestamp => "TIMESTAMP_TEXT",
        }
    }

    /// Inverse of [`DataType::sqlite_decl`].
    pub fn from_sqlite_decl(decl: &str) -> Option<DataType> {
        Some(match decl.to_ascii_uppercase().as_str() {
            "BOOLEAN" => DataType::Boolean,
            "INT" => DataType::Int,
            "BIGINT" => DataType::BigInt,
            "DOUBLE" => DataType::Double,
            "STRING_TEXT" => DataType::String,
            "DATE_TEXT" => DataType::Date,
            "TIMESTAMP_TEXT" => DataType::Timestamp,
            _ => return None,
        })
    }
}

#[derive(Clone, Debug, PartialEq)]
pub enum Value {
    Null,
    Bool(bool),
    Int(i64),
    Double(f64),
    Str(String),
}

#[derive(Clone, Debug)]
pub struct Column {
    pub name: String,
    pub data_type: DataType,
}

/// A row filter: rows for which `expr` is not true are invisible to the caller.
#[derive(Clone, Debug)]
pub struct RowFilter {
    /// The filter function's name, as `DESCRIBE TABLE EXTENDED` would show it.
    pub function: String,
    pub expr: String,
}

/// A column mask: the caller sees `expr` instead of the column's value.
#[derive(Clone, Debug)]
pub struct ColumnMask {
    pub column: String,
    pub function: String,
    pub expr: String,
}

#[derive(Clone, Debug)]
pub struct Table {
    pub catalog: String,
    pub schema: String,
    pub name: String,
    pub owner: String,
    pub comment: Option<String>,
    pub columns: Vec<Column>,
    pub rows: Vec<Vec<Value>>,
    pub row_filter: Option<RowFilter>,
    pub column_masks: Vec<ColumnMask>,
    /// A view's defining query. A view is read with its owner's privileges on what it
    /// references, while row filters and column masks still apply to the caller, as in Unity
    /// Catalog; the caller needs `SELECT` on the view itself.
    pub view_definition: Option<String>,
}

impl Table {
    pub fn full_name(&self) -> String {
        format!("{}.{}.{}", self.catalog, self.schema, self.name)
    }

    pub fn mask_for(&self, column: &str) -> Option<&ColumnMask> {
        self.column_masks
            .iter()
            .find(|m| m.column.eq_ignore_ascii_case(column))
    }
}

#[derive(Clone, Debug)]
pub struct Catalog {
    pub name: String,
    pub owner: String,
    pub comment: Option<String>,
    /// Set for a federated (foreign) catalog: the Lakehouse Federation connection it mirrors.
    pub connection_name: Option<String>,
}

impl Catalog {
    /// `catalog_type` as the Unity Catalog API reports it.
    pub fn catalog_type(&self) -> &'static str {
        if self.connection_name.is_some() {
            "FOREIGN_CATALOG"
        } else {
            "MANAGED_CATALOG"
        }
    }
}

/// A Unity Catalog SQL table function: `sql` is a query whose `:name` markers are the
/// parameters. It runs with the caller's privileges (so grants, row filters and masks apply to
/// the caller); calling it needs `EXECUTE` on it.
#[derive(Clone, Debug)]
pub struct Function {
    pub catalog: String,
    pub schema: String,
    pub name: String,
    pub owner: String,
    pub comment: String,
    /// (name, type, comment)
    pub params: Vec<(String, DataType, String)>,
    pub sql: String,
}

impl Function {
    pub fn full_name(&self) -> String {
        format!("{}.{}.{}", self.catalog, self.schema, self.name)
    }
}

/// A canned question a Genie space knows how to answer: every keyword must appear in the
/// question (case-insensitive). The sandbox has no language model; this is its "instructions".
#[derive(Clone, Debug)]
pub struct GenieQuestion {
    pub keywords: Vec<String>,
    pub title: String,
    pub description: String,
    pub sql: String,
}

#[derive(Clone, Debug)]
pub struct GenieSpace {
    pub id: String,
    pub title: String,
    pub description: String,
    pub warehouse_id: String,
    /// Principals with CAN_RUN (or better) on the space.
    pub can_run: Vec<String>,
    pub questions: Vec<GenieQuestion>,
}

impl GenieSpace {
    pub fn answer(&self, question: &str) -> Option<&GenieQuestion> {
        let q = question.to_lowercase();
        self.questions
            .iter()
            .find(|g| g.keywords.iter().all(|k| q.contains(k.as_str())))
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ObjectType {
    Directory,
    Notebook,
}

impl ObjectType {
    pub fn as_str(self) -> &'static str {
        match self {
            ObjectType::Directory => "DIRECTORY",
            ObjectType::Notebook => "NOTEBOOK",
        }
    }
}

/// A workspace file-tree object. Read access: workspace admins (`admins`), the owner, or a
/// principal named in the ACL of the object or of any directory above it.
#[derive(Clone, Debug)]
pub struct WorkspaceObject {
    pub object_id: i64,
    pub path: String,
    pub object_type: ObjectType,
    pub language: Option<&'static str>,
    pub owner: Option<String>,
    /// Principals with CAN_READ or better.
    pub readers: Vec<String>,
}

#[derive(Clone, Debug)]
pub struct Schema {
    pub catalog: String,
    pub name: String,
    pub owner: String,
    pub comment: Option<String>,
}

/// Something privileges are granted on. Names are stored lower-case, as Unity Catalog does.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Securable {
    Catalog(String),
    Schema(String, String),
    Table(String, String, String),
    Function(String, String, String),
}

impl Securable {
    /// This securable and every securable it inherits privileges from, innermost first.
    pub fn with_ancestors(&self) -> Vec<Securable> {
        match self {
            Securable::Catalog(_) => vec![self.clone()],
            Securable::Schema(c, _) => vec![self.clone(), Securable::Catalog(c.clone())],
            Securable::Table(c, s, _) | Securable::Function(c, s, _) => vec![
                self.clone(),
                Securable::Schema(c.clone(), s.clone()),
                Securable::Catalog(c.clone()),
            ],
        }
    }

    /// The `securable_type` of the Unity Catalog permissions API.
    pub fn type_name(&self) -> &'static str {
        match self {
            Securable::Catalog(_) => "CATALOG",
            Securable::Schema(..) => "SCHEMA",
            Securable::Table(..) => "TABLE",
            Securable::Function(..) => "FUNCTION",
        }
    }

    /// The kind as Databricks names it in permission errors ("Catalog", "Schema", "Table").
    pub fn kind(&self) -> &'static str {
        match self {
            Securable::Catalog(_) => "Catalog",
            Securable::Schema(..) => "Schema",
            Securable::Table(..) => "Table",
            Securable::Function(..) => "Function",
        }
    }
}

impl fmt::Display for Securable {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Securable::Catalog(c) => write!(f, "{c}"),
            Securable::Schema(c, s) => write!(f, "{c}.{s}"),
            Securable::Table(c, s, t) | Securable::Function(c, s, t) => {
                write!(f, "{c}.{s}.{t}")
            }
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Privilege {
    AllPrivileges,
    UseCatalog,
    UseSchema,
    Select,
    Modify,
    Browse,
    Execute,
}

impl Privilege {
    pub fn as_str(self) -> &'static str {
        match self {
            Privilege::AllPrivileges => "ALL PRIVILEGES",
            Privilege::UseCatalog => "USE CATALOG",
            Privilege::UseSchema => "USE SCHEMA",
            Privilege::Select => "SELECT",
            Privilege::Modify => "MODIFY",
            Privilege::Browse => "BROWSE",
            Privilege::Execute => "EXECUTE",
        }
    }

    /// The name in the Unity Catalog REST API (`USE_CATALOG`, `ALL_PRIVILEGES`, ...).
    pub fn api_name(self) -> &'static str {
        match self {
            Privilege::AllPrivileges => "ALL_PRIVILEGES",
            Privilege::UseCatalog => "USE_CATALOG",
            Privilege::UseSchema => "USE_SCHEMA",
            other => other.as_str(),
        }
    }

    pub const ALL: [Privilege; 7] = [
        Privilege::AllPrivileges,
        Privilege::UseCatalog,
        Privilege::UseSchema,
        Privilege::Select,
        Privilege::Modify,
        Privilege::Browse,
        Privilege::Execute,
    ];
}

#[derive(Clone, Debug)]
pub struct Grant {
    /// A user name or a group name.
    pub principal: String,
    pub securable: Securable,
    pub privileges: Vec<Privilege>,
}

#[derive(Clone, Debug)]
pub struct Warehouse {
    pub id: String,
    pub name: String,
    /// Principals with CAN_USE.
    pub can_use: Vec<String>,
}

// === Compute, AI/BI dashboards and Delta Sharing ===

/// One entry of a workspace object's access control list (clusters, dashboards): a principal (a
/// user name or a group name) and the permission level it holds directly.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AclEntry {
    pub principal: String,
    pub level: String,
}

/// An all-purpose cluster. Its ACL follows Databricks' compute permissions: `CAN_ATTACH_TO`
/// (attach, run commands), `CAN_RESTART` (+ start, restart, terminate), `CAN_MANAGE` (+ edit,
/// change permissions); workspace admins hold `CAN_MANAGE` on every cluster.
#[derive(Clone, Debug)]
pub struct Cluster {
    pub id: String,
    pub name: String,
    pub creator: String,
    /// RUNNING when the sandbox starts (else TERMINATED).
    pub running: bool,
    pub acl: Vec<AclEntry>,
}

/// A dataset of an AI/BI (Lakeview) dashboard: a query the dashboard runs on its warehouse.
#[derive(Clone, Debug)]
pub struct DashboardDataset {
    pub name: String,
    pub display_name: String,
    pub query: String,
}

/// An AI/BI (Lakeview) dashboard. Its ACL levels are `CAN_READ`, `CAN_RUN`, `CAN_EDIT` and
/// `CAN_MANAGE`; workspace admins hold `CAN_MANAGE`. A published dashboard in the fixture never
/// embeds its publisher's credentials: every viewer's queries run as the viewer.
#[derive(Clone, Debug)]
pub struct Dashboard {
    pub id: String,
    pub display_name: String,
    pub parent_path: String,
    pub warehouse_id: String,
    pub owner: String,
    pub published: bool,
    pub datasets: Vec<DashboardDataset>,
    pub acl: Vec<AclEntry>,
}

/// A Delta Sharing share: tables of this metastore, and the recipients granted `SELECT` on it.
#[derive(Clone, Debug)]
pub struct Share {
    pub name: String,
    pub owner: String,
    pub comment: String,
    /// Full names of the shared tables.
    pub tables: Vec<String>,
    /// Recipients holding SELECT on the share.
    pub recipients: Vec<String>,
}

/// A Delta Sharing recipient (`TOKEN`: open sharing; `DATABRICKS`: another metastore).
#[derive(Clone, Debug)]
pub struct Recipient {
    pub name: String,
    pub owner: String,
    pub comment: String,
    pub authentication_type: &'static str,
    pub global_metastore_id: Option<String>,
}

/// A Delta Sharing provider (an organization that shares data with this metastore).
#[derive(Clone, Debug)]
pub struct Provider {
    pub name: String,
    pub owner: String,
    pub comment: String,
    pub global_metastore_id: String,
}

/// The metastore privileges Delta Sharing checks (granted on the metastore itself).
pub const METASTORE_PRIVILEGES: [&str; 7] = [
    "CREATE_SHARE",
    "CREATE_RECIPIENT",
    "CREATE_PROVIDER",
    "USE_SHARE",
    "USE_RECIPIENT",
    "USE_PROVIDER",
    "SET_SHARE_PERMISSION",
];

/// The metastore the workspace is attached to.
pub const METASTORE_ID: &str = "11111111-2222-4333-8444-555555555555";
/// This metastore's Delta Sharing identifier (`<cloud>:<region>:<metastore id>`).
pub const GLOBAL_METASTORE_ID: &str = "aws:us-west-2:11111111-2222-4333-8444-555555555555";

/// A running cluster alice may attach to (analysts) but not start or manage.
pub const CLUSTER_SHARED: &str = "0601-101010-shared01";
/// A terminated cluster: alice may attach, bob may restart it.
pub const CLUSTER_ETL: &str = "0601-101010-etlnight";
/// The admins' cluster: nobody else holds a permission on it.
pub const CLUSTER_ADMIN: &str = "0601-101010-adminops";
/// The published sales dashboard (alice and bob may run it).
pub const DASHBOARD_SALES: &str = "01f0d5a1b2c3d4e5f60718293a4b5c6d";
/// carol's private payroll dashboard.
pub const DASHBOARD_PAYROLL: &str = "01f0e6f7a8b9c0d1e2f30415263748a9";

fn acl(entries: &[(&str, &str)]) -> Vec<AclEntry> {
    entries
        .iter()
        .map(|(p, l)| AclEntry {
            principal: p.to_string(),
            level: l.to_string(),
        })
        .collect()
}

/// The fixture's clusters, dashboards and Delta Sharing objects.
struct ComputeAndSharing {
    clusters: Vec<Cluster>,
    dashboards: Vec<Dashboard>,
    shares: Vec<Share>,
    recipients: Vec<Recipient>,
    providers: Vec<Provider>,
    metastore_grants: Vec<(String, Vec<&'static str>)>,
}

fn compute_and_sharing() -> ComputeAndSharing {
    let clusters = vec![
        Cluster {
            id: CLUSTER_SHARED.into(),
            name: "Shared analytics".into(),
            creator: "carol@example.com".into(),
            running: true,
            acl: acl(&[
                ("carol@example.com", "CAN_MANAGE"),
                ("analysts", "CAN_ATTACH_TO"),
            ]),
        },
        Cluster {
            id: CLUSTER_ETL.into(),
            name: "Nightly ETL".into(),
            creator: "carol@example.com".into(),
            running: false,
            acl: acl(&[
                ("carol@example.com", "CAN_MANAGE"),
                ("alice@example.com", "CAN_ATTACH_TO"),
                ("bob@example.com", "CAN_RESTART"),
            ]),
        },
        Cluster {
            id: CLUSTER_ADMIN.into(),
            name: "Admin operations".into(),
            creator: "carol@example.com".into(),
            running: true,
            acl: acl(&[("carol@example.com", "CAN_MANAGE")]),
        },
    ];
    let dashboards = vec![
        Dashboard {
            id: DASHBOARD_SALES.into(),
            display_name: "Sales overview".into(),
            parent_path: "/Shared".into(),
            warehouse_id: WAREHOUSE_ID.into(),
            owner: "carol@example.com".into(),
            published: true,
            datasets: vec![
                DashboardDataset {
                    name: "4f2a9c1e".into(),
                    display_name: "Orders by region".into(),
                    query: "SELECT region, COUNT(*) AS orders, SUM(amount) AS total_amount \
                            FROM main.sales.orders GROUP BY region ORDER BY region"
                        .into(),
                },
                DashboardDataset {
                    name: "7b3d0e52".into(),
                    display_name: "Customers".into(),
                    query: "SELECT order_id, customer_email FROM main.sales.orders \
                            ORDER BY order_id"
                        .into(),
                },
            ],
            acl: acl(&[
                ("carol@example.com", "CAN_MANAGE"),
                ("alice@example.com", "CAN_RUN"),
                ("bob@example.com", "CAN_RUN"),
            ]),
        },
        Dashboard {
            id: DASHBOARD_PAYROLL.into(),
            display_name: "Payroll".into(),
            parent_path: "/Users/carol@example.com".into(),
            warehouse_id: WAREHOUSE_ID.into(),
            owner: "carol@example.com".into(),
            published: false,
            datasets: vec![DashboardDataset {
                name: "9c8d7e6f".into(),
                display_name: "Salaries".into(),
                query: "SELECT employee, salary FROM main.hr.salaries ORDER BY employee".into(),
            }],
            acl: acl(&[("carol@example.com", "CAN_MANAGE")]),
        },
    ];
    let shares = vec![
        Share {
            name: "sales_share".into(),
            owner: "alice@example.com".into(),
            comment: "Orders for our resellers".into(),
            tables: vec!["main.sales.orders".into()],
            recipients: vec![],
        },
        Share {
            name: "hr_share".into(),
            owner: "admins".into(),
            comment: "Payroll for the auditors".into(),
            tables: vec!["main.hr.salaries".into()],
            recipients: vec!["auditor_co".into()],
        },
    ];
    let recipients = vec![
        Recipient {
            name: "partner_acme".into(),
            owner: "alice@example.com".into(),
            comment: "Acme, a reseller (open sharing)".into(),
            authentication_type: "TOKEN",
            global_metastore_id: None,
        },
        Recipient {
            name: "auditor_co".into(),
            owner: "admins".into(),
            comment: "The external auditors' Databricks metastore".into(),
            authentication_type: "DATABRICKS",
            global_metastore_id: Some("aws:eu-west-1:9a8b7c6d-5e4f-4a3b-8c2d-1e0f9a8b7c6d".into()),
        },
    ];
    let providers = vec![Provider {
        name: "market_data_inc".into(),
        owner: "admins".into(),
        comment: "Reference market data".into(),
        global_metastore_id: "aws:us-east-1:0f1e2d3c-4b5a-4968-8776-a5b4c3d2e1f0".into(),
    }];
    let metastore_grants = vec![
        (
            "alice@example.com".to_string(),
            vec!["CREATE_SHARE", "CREATE_RECIPIENT"],
        ),
        (
            "bob@example.com".to_string(),
            vec!["USE_SHARE", "USE_RECIPIENT"],
        ),
    ];
    ComputeAndSharing {
        clusters,
        dashboards,
        shares,
        recipients,
        providers,
        metastore_grants,
    }
}

// === The fixture ===

#[derive(Clone, Debug)]
pub struct Fixture {
    pub users: Vec<User>,
    pub groups: Vec<Group>,
    pub catalogs: Vec<Catalog>,
    pub schemas: Vec<Schema>,
    pub tables: Vec<Table>,
    pub grants: Vec<Grant>,
    pub warehouses: Vec<Warehouse>,
    pub functions: Vec<Function>,
    pub genie_spaces: Vec<GenieSpace>,
    pub objects: Vec<WorkspaceObject>,
    pub clusters: Vec<Cluster>,
    pub dashboards: Vec<Dashboard>,
    pub shares: Vec<Share>,
    pub recipients: Vec<Recipient>,
    pub providers: Vec<Provider>,
    /// Metastore admins (principals) hold every metastore privilege and pass every owner check.
    pub metastore_admins: Vec<String>,
    /// Privileges granted on the metastore: (principal, privileges).
    pub metastore_grants: Vec<(String, Vec<&'static str>)>,
}

/// Display names the dev IdP and the workspace directory agree on.
pub fn known_person(short: &str) -> Option<(&'static str, &'static str)> {
    match short {
        "alice" => Some(("Alice", "Anders")),
        "bob" => Some(("Bob", "Baker")),
        "carol" => Some(("Carol", "Chen")),
        _ => None,
    }
}

/// The people the dev IdP signs in through its `/authorize` page (short names), with the groups
/// its ID tokens carry in `aegis_roles`: the aegis console maps them to roles in the tests
/// (`aegis-operators` → operator, `aegis-viewers` → viewer, `aegis-auditors` → auditor). `dave`
/// is in no console group.
pub const IDP_PEOPLE: &[(&str, &[&str])] = &[
    ("alice", &["aegis-operators"]),
    ("bob", &["aegis-viewers"]),
    ("carol", &["aegis-auditors"]),
    ("dave", &[]),
];

/// The console groups of a person the dev IdP knows, or None for a stranger.
pub fn idp_person(short: &str) -> Option<&'static [&'static str]> {
    IDP_PEOPLE
        .iter()
        .find(|(name, _)| *name == short)
        .map(|(_, groups)| *groups)
}

/// The Genie space every user may run (its data still follows each user's grants).
pub const GENIE_SALES_SPACE: &str = "01f0a1b2c3d4e5f60718293a4b5c6d7e";
/// The Genie space only `admins` may run.
pub const GENIE_HR_SPACE: &str = "01f0ffeeddccbbaa0099887766554433";

fn workspace_objects() -> Vec<WorkspaceObject> {
    let mut next_id = 1_000_000_000_000_i64;
    let mut obj = |path: &str, nb: Option<&'static str>, owner: Option<&str>, readers: &[&str]| {
        next_id += 1;
        WorkspaceObject {
            object_id: next_id,
            path: path.to_string(),
            object_type: if nb.is_some() {
                ObjectType::Notebook
            } else {
                ObjectType::Directory
            },
            language: nb,
            owner: owner.map(str::to_string),
            readers: readers.iter().map(|r| r.to_string()).collect(),
        }
    };
    let mut objects = vec![
        obj("/", None, None, &[ALL_USERS_GROUP]),
        obj("/Users", None, None, &[ALL_USERS_GROUP]),
        obj("/Shared", None, None, &[ALL_USERS_GROUP]),
        obj(
            "/Shared/team_queries",
            Some("SQL"),
            None,
            &[ALL_USERS_GROUP],
        ),
        obj("/Shared/finance", None, Some("carol@example.com"), &[]),
        obj("/Shared/finance/forecast", Some("PYTHON"), None, &[]),
    ];
    for (user, notebooks) in [
        ("alice", &["churn_analysis", "private_notes"][..]),
        ("bob", &["scratch"][..]),
        ("carol", &["payroll_review"][..]),
    ] {
        let home = format!("/Users/{user}@example.com");
        let owner = format!("{user}@example.com");
        objects.push(obj(&home, None, Some(&owner), &[]));
        for nb in notebooks {
            // alice shares one notebook with bob; the rest stay private.
            let readers: &[&str] = if *nb == "churn_analysis" {
                &["bob@example.com"]
            } else {
                &[]
            };
            objects.push(obj(&format!("{home}/{nb}"), Some("PYTHON"), None, readers));
        }
    }
    objects
}

fn user(id: &str, short: &str, groups: &[&str]) -> User {
    let (given, family) = known_person(short).unwrap_or(("Test", "User"));
    User {
        id: id.to_string(),
        user_name: format!("{short}@example.com"),
        given_name: given.to_string(),
        family_name: family.to_string(),
        groups: groups.iter().map(|g| g.to_string()).collect(),
    }
}

fn grant(principal: &str, securable: Securable, privileges: &[Privilege]) -> Grant {
    Grant {
        principal: principal.to_string(),
        securable,
        privileges: privileges.to_vec(),
    }
}

fn cat(c: &str) -> Securable {
    Securable::Catalog(c.to_string())
}

fn sch(c: &str, s: &str) -> Securable {
    Securable::Schema(c.to_string(), s.to_string())
}

fn tbl(c: &str, s: &str, t: &str) -> Securable {
    Securable::Table(c.to_string(), s.to_string(), t.to_string())
}

fn col(name: &str, data_type: DataType) -> Column {
    Column {
        name: name.to_string(),
        data_type,
    }
}

fn s(v: &str) -> Value {
    Value::Str(v.to_string())
}

impl Fixture {
    /// The fixture the tests and the demo rely on; README.md documents it.
    pub fn standard() -> Fixture {
        use Privilege::*;
        let users = vec![
            user("7001000000000001", "alice", &["analysts", "emea"]),
            user("7001000000000002", "bob", &["contractors", "amer"]),
            user("7001000000000003", "carol", &["admins", "pii_readers"]),
        ];
        let groups = [
            ("7002000000000001", "admins"),
            ("7002000000000002", "analysts"),
            ("7002000000000003", "contractors"),
            ("7002000000000004", "pii_readers"),
            ("7002000000000005", "emea"),
            ("7002000000000006", "amer"),
            ("7002000000000007", "apac"),
            ("7002000000000008", ALL_USERS_GROUP),
        ]
        .iter()
        .map(|(id, name)| Group {
            id: id.to_string(),
            name: name.to_string(),
        })
        .collect();
        let ComputeAndSharing {
            clusters,
            dashboards,
            shares,
            recipients,
            providers,
            metastore_grants,
        } = compute_and_sharing();

        let orders = Table {
            catalog: "main".into(),
            schema: "sales".into(),
            name: "orders".into(),
            owner: "admins".into(),
            comment: Some("Customer orders, one row per order".into()),
            columns: vec![
                col("order_id", DataType::Int),
                col("region", DataType::String),
                col("customer_email", DataType::String),
                col("amount", DataType::Double),
            ],
            rows: [
                (1, "EMEA", "anna@example.org", 120.5),
                (2, "EMEA", "bjorn@example.net", 75.0),
                (3, "EMEA", "chloe@example.org", 310.25),
                (4, "AMER", "dave@example.com", 42.0),
                (5, "AMER", "erin@example.net", 980.0),
                (6, "AMER", "frank@example.com", 15.75),
                (7, "APAC", "gita@example.org", 560.0),
                (8, "APAC", "hiro@example.net", 88.8),
            ]
            .iter()
            .map(|(id, region, email, amount)| {
                vec![Value::Int(*id), s(region), s(email), Value::Double(*amount)]
            })
            .collect(),
            row_filter: Some(RowFilter {
                function: "main.sales.region_filter".into(),
                expr: "is_account_group_member('admins') \
                       OR (region = 'EMEA' AND is_account_group_member('emea')) \
                       OR (region = 'AMER' AND is_account_group_member('amer')) \
                       OR (region = 'APAC' AND is_account_group_member('apac'))"
                    .into(),
            }),
            column_masks: vec![ColumnMask {
                column: "customer_email".into(),
                function: "main.sales.email_mask".into(),
                expr: "CASE WHEN is_account_group_member('pii_readers') \
                       THEN customer_email ELSE '***' END"
                    .into(),
            }],
            view_definition: None,
        };
        let salaries = Table {
            catalog: "main".into(),
            schema: "hr".into(),
            name: "salaries".into(),
            owner: "admins".into(),
            comment: Some("Employee salaries".into()),
            columns: vec![
                col("employee", DataType::String),
                col("salary", DataType::Double),
            ],
            rows: [("alice", 98000.0), ("bob", 72000.0), ("carol", 150000.0)]
                .iter()
                .map(|(e, v)| vec![s(e), Value::Double(*v)])
                .collect(),
            row_filter: None,
            column_masks: vec![],
            view_definition: None,
        };
        // A view over orders, owned by admins: readers need SELECT on the view only, and the
        // orders row filter still applies to them.
        let region_totals = Table {
            catalog: "main".into(),
            schema: "sales".into(),
            name: "region_totals".into(),
            owner: "admins".into(),
            comment: Some("Order count and amount per region".into()),
            columns: vec![
                col("region", DataType::String),
                col("orders", DataType::BigInt),
                col("total_amount", DataType::Double),
            ],
            rows: vec![],
            row_filter: None,
            column_masks: vec![],
            view_definition: Some(
                "SELECT region, COUNT(*) AS orders, SUM(amount) AS total_amount \
                 FROM main.sales.orders GROUP BY region"
                    .into(),
            ),
        };
        // The federated catalog's table: each user sees only their own events.
        let web_events = Table {
            catalog: "snowflake_fed".into(),
            schema: "analytics".into(),
            name: "web_events".into(),
            owner: "admins".into(),
            comment: Some("Web events, federated from Snowflake".into()),
            columns: vec![
                col("event_id", DataType::Int),
                col("user_email", DataType::String),
                col("page", DataType::String),
                col("duration_ms", DataType::BigInt),
            ],
            rows: [
                (1, "alice@example.com", "/pricing", 5200),
                (2, "alice@example.com", "/docs", 31000),
                (3, "bob@example.com", "/careers", 1200),
                (4, "carol@example.com", "/admin", 800),
                (5, "alice@example.com", "/blog", 9400),
            ]
            .iter()
            .map(|(id, who, page, ms)| vec![Value::Int(*id), s(who), s(page), Value::Int(*ms)])
            .collect(),
            row_filter: Some(RowFilter {
                function: "snowflake_fed.analytics.own_events".into(),
                expr: "is_account_group_member('admins') OR user_email = current_user()".into(),
            }),
            column_masks: vec![],
            view_definition: None,
        };

        Fixture {
            users,
            groups,
            catalogs: vec![
                Catalog {
                    name: "main".into(),
                    owner: "admins".into(),
                    comment: Some("Main catalog".into()),
                    connection_name: None,
                },
                Catalog {
                    name: "snowflake_fed".into(),
                    owner: "admins".into(),
                    comment: Some("Lakehouse Federation: the Snowflake analytics account".into()),
                    connection_name: Some("snowflake_conn".into()),
                },
            ],
            schemas: [
                ("main", "default"),
                ("main", "sales"),
                ("main", "hr"),
                ("snowflake_fed", "analytics"),
            ]
            .iter()
            .map(|(catalog, name)| Schema {
                catalog: catalog.to_string(),
                name: name.to_string(),
                owner: "admins".into(),
                comment: None,
            })
            .collect(),
            tables: vec![orders, salaries, region_totals, web_events],
            grants: vec![
                grant("admins", cat("main"), &[AllPrivileges]),
                grant("alice@example.com", cat("main"), &[UseCatalog]),
                grant("alice@example.com", sch("main", "sales"), &[UseSchema]),
                grant(
                    "alice@example.com",
                    tbl("main", "sales", "orders"),
                    &[Select],
                ),
                grant("bob@example.com", cat("main"), &[UseCatalog]),
                grant("bob@example.com", sch("main", "sales"), &[UseSchema]),
                grant(
                    "bob@example.com",
                    tbl("main", "sales", "region_totals"),
                    &[Select],
                ),
                grant("analysts", cat("snowflake_fed"), &[UseCatalog]),
                grant("analysts", sch("snowflake_fed", "analytics"), &[UseSchema]),
                grant(
                    "analysts",
                    tbl("snowflake_fed", "analytics", "web_events"),
                    &[Select],
                ),
                grant(
                    ALL_USERS_GROUP,
                    Securable::Function("main".into(), "sales".into(), "orders_in_region".into()),
                    &[Execute],
                ),
            ],
            warehouses: vec![Warehouse {
                id: WAREHOUSE_ID.into(),
                name: "Sandbox Serverless Warehouse".into(),
                can_use: vec![ALL_USERS_GROUP.into()],
            }],
            functions: vec![
                Function {
                    catalog: "main".into(),
                    schema: "sales".into(),
                    name: "orders_in_region".into(),
                    owner: "admins".into(),
                    comment: "The orders of one region (EMEA, AMER or APAC)".into(),
                    params: vec![(
                        "region_name".into(),
                        DataType::String,
                        "EMEA, AMER or APAC".into(),
                    )],
                    sql: "SELECT order_id, region, customer_email, amount \
                          FROM main.sales.orders WHERE region = :region_name ORDER BY order_id"
                        .into(),
                },
                Function {
                    catalog: "main".into(),
                    schema: "hr".into(),
                    name: "salary_of".into(),
                    owner: "admins".into(),
                    comment: "One employee's salary".into(),
                    params: vec![("employee_name".into(), DataType::String, "Employee".into())],
                    sql: "SELECT employee, salary FROM main.hr.salaries \
                          WHERE employee = :employee_name"
                        .into(),
                },
            ],
            genie_spaces: vec![
                GenieSpace {
                    id: GENIE_SALES_SPACE.into(),
                    title: "Sales analytics".into(),
                    description: "Orders, regions and customers".into(),
                    warehouse_id: WAREHOUSE_ID.into(),
                    can_run: vec![ALL_USERS_GROUP.into()],
                    questions: vec![
                        GenieQuestion {
                            keywords: vec!["orders".into(), "region".into()],
                            title: "Orders by region".into(),
                            description: "Counts orders and sums their amounts per region.".into(),
                            sql: "SELECT region, COUNT(*) AS orders, SUM(amount) AS total_amount \
                                  FROM main.sales.orders GROUP BY region ORDER BY region"
                                .into(),
                        },
                        GenieQuestion {
                            keywords: vec!["customer".into()],
                            title: "Largest customers".into(),
                            description: "The five largest orders and their customers.".into(),
                            sql: "SELECT customer_email, amount FROM main.sales.orders \
                                  ORDER BY amount DESC LIMIT 5"
                                .into(),
                        },
                    ],
                },
                GenieSpace {
                    id: GENIE_HR_SPACE.into(),
                    title: "People analytics".into(),
                    description: "Salaries".into(),
                    warehouse_id: WAREHOUSE_ID.into(),
                    can_run: vec!["admins".into()],
                    questions: vec![GenieQuestion {
                        keywords: vec!["salar".into()],
                        title: "Salaries".into(),
                        description: "Every employee's salary.".into(),
                        sql: "SELECT employee, salary FROM main.hr.salaries ORDER BY employee"
                            .into(),
                    }],
                },
            ],
            objects: workspace_objects(),
            clusters,
            dashboards,
            shares,
            recipients,
            providers,
            metastore_admins: vec!["admins".into()],
            metastore_grants,
        }
    }

    pub fn user(&self, user_name: &str) -> Option<&User> {
        self.users
            .iter()
            .find(|u| u.user_name.eq_ignore_ascii_case(user_name))
    }

    pub fn group(&self, name: &str) -> Option<&Group> {
        self.groups
            .iter()
            .find(|g| g.name.eq_ignore_ascii_case(name))
    }

    pub fn principal(&self, user: &User) -> Principal {
        Principal {
            user_name: user.user_name.clone(),
            groups: user.groups.clone(),
        }
    }

    pub fn catalog(&self, name: &str) -> Option<&Catalog> {
        self.catalogs
            .iter()
            .find(|c| c.name.eq_ignore_ascii_case(name))
    }

    pub fn schema(&self, catalog: &str, name: &str) -> Option<&Schema> {
        self.schemas
            .iter()
            .find(|s| s.catalog.eq_ignore_ascii_case(catalog) && s.name.eq_ignore_ascii_case(name))
    }

    pub fn table(&self, catalog: &str, schema: &str, name: &str) -> Option<&Table> {
        self.tables.iter().find(|t| {
            t.catalog.eq_ignore_ascii_case(catalog)
                && t.schema.eq_ignore_ascii_case(schema)
                && t.name.eq_ignore_ascii_case(name)
        })
    }

    pub fn function(&self, catalog: &str, schema: &str, name: &str) -> Option<&Function> {
        self.functions.iter().find(|f| {
            f.catalog.eq_ignore_ascii_case(catalog)
                && f.schema.eq_ignore_ascii_case(schema)
                && f.name.eq_ignore_ascii_case(name)
        })
    }

    pub fn genie_space(&self, id: &str) -> Option<&GenieSpace> {
        self.genie_spaces.iter().find(|g| g.id == id)
    }

    pub fn object(&self, path: &str) -> Option<&WorkspaceObject> {
        self.objects.iter().find(|o| o.path == path)
    }

    /// Whether `who` may read the workspace object at `path` (see [`WorkspaceObject`]).
    /// Permissions granted on a directory are inherited by everything below it, except on the
    /// top-level directories (`/`, `/Users`, `/Shared`), where they cover only the directory:
    /// everyone can open `/Users`, nobody else can read a user's home.
    pub fn can_read_object(&self, who: &Principal, path: &str) -> bool {
        if who.is_member("admins") {
            return true;
        }
        let grants = |o: &WorkspaceObject| {
            o.owner.as_deref().is_some_and(|owner| who.matches(owner))
                || o.readers.iter().any(|r| who.matches(r))
        };
        self.objects.iter().any(|o| {
            let top = matches!(o.path.as_str(), "/" | "/Users" | "/Shared");
            let covers = o.path == path
                || (!top && path.starts_with(&o.path) && path[o.path.len()..].starts_with('/'));
            covers && grants(o)
        })
    }

    pub fn cluster(&self, id: &str) -> Option<&Cluster> {
        self.clusters.iter().find(|c| c.id == id)
    }

    pub fn dashboard(&self, id: &str) -> Option<&Dashboard> {
        self.dashboards.iter().find(|d| d.id == id)
    }

    /// Whether `who` is a metastore admin.
    pub fn is_metastore_admin(&self, who: &Principal) -> bool {
        self.metastore_admins.iter().any(|a| who.matches(a))
    }

    /// Whether `who` holds `privilege` on the metastore (metastore admins hold them all).
    pub fn has_metastore_privilege(&self, who: &Principal, privilege: &str) -> bool {
        self.is_metastore_admin(who)
            || self
                .metastore_grants
                .iter()
                .any(|(p, privs)| who.matches(p) && privs.contains(&privilege))
    }

    pub fn warehouse(&self, id: &str) -> Option<&Warehouse> {
        self.warehouses.iter().find(|w| w.id == id)
    }

    fn owner_of(&self, securable: &Securable) -> Option<&str> {
        match securable {
            Securable::Catalog(c) => self.catalog(c).map(|c| c.owner.as_str()),
            Securable::Schema(c, s) => self.schema(c, s).map(|s| s.owner.as_str()),
            Securable::Table(c, s, t) => self.table(c, s, t).map(|t| t.owner.as_str()),
            Securable::Function(c, s, f) => self.function(c, s, f).map(|f| f.owner.as_str()),
        }
    }

    /// Whether `who` holds `privilege` on `securable`, directly, through a group, through
    /// inheritance from a parent securable, or as the owner of it or of a parent.
    pub fn has_privilege(
        &self,
        who: &Principal,
        securable: &Securable,
        privilege: Privilege,
    ) -> bool {
        securable.with_ancestors().iter().any(|s| {
            self.owner_of(s).is_some_and(|owner| who.matches(owner))
                || self.grants.iter().any(|g| {
                    &g.securable == s
                        && who.matches(&g.principal)
                        && g.privileges
                            .iter()
                            .any(|p| *p == privilege || *p == Privilege::AllPrivileges)
                })
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn principal(f: &Fixture, short: &str) -> Principal {
        let u = f
            .user(&format!("{short}@example.com"))
            .expect("fixture user");
        f.principal(u)
    }

    #[test]
    fn grants_follow_the_fixture() {
        let f = Fixture::standard();
        let orders = tbl("main", "sales", "orders");
        let (alice, bob, carol) = (
            principal(&f, "alice"),
            principal(&f, "bob"),
            principal(&f, "carol"),
        );
        assert!(f.has_privilege(&alice, &orders, Privilege::Select));
        assert!(!f.has_privilege(&bob, &orders, Privilege::Select));
        assert!(f.has_privilege(&bob, &sch("main", "sales"), Privilege::UseSchema));
        assert!(f.has_privilege(&carol, &tbl("main", "hr", "salaries"), Privilege::Select));
        assert!(!f.has_privilege(&alice, &sch("main", "hr"), Privilege::UseSchema));
        assert!(!f.has_privilege(&alice, &orders, Privilege::Modify));
    }

    #[test]
    fn notebook_acls_follow_owners_shares_and_admins() {
        let f = Fixture::standard();
        let (alice, bob, carol) = (
            principal(&f, "alice"),
            principal(&f, "bob"),
            principal(&f, "carol"),
        );
        let private = "/Users/alice@example.com/private_notes";
        let shared = "/Users/alice@example.com/churn_analysis";
        assert!(f.can_read_object(&alice, private));
        assert!(!f.can_read_object(&bob, private));
        assert!(f.can_read_object(&bob, shared));
        assert!(!f.can_read_object(&bob, "/Users/alice@example.com"));
        assert!(
            f.can_read_object(&carol, private),
            "workspace admins read everything"
        );
        assert!(f.can_read_object(&bob, "/Users"));
        assert!(f.can_read_object(&bob, "/Shared/team_queries"));
        assert!(!f.can_read_object(&alice, "/Shared/finance/forecast"));
        // A path that merely starts with a readable one is not below it.
        assert!(!f.can_read_object(&alice, "/Users/alice@example.comx"));
    }
}
