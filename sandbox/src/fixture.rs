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
}

impl Securable {
    /// This securable and every securable it inherits privileges from, innermost first.
    pub fn with_ancestors(&self) -> Vec<Securable> {
        match self {
            Securable::Catalog(_) => vec![self.clone()],
            Securable::Schema(c, _) => vec![self.clone(), Securable::Catalog(c.clone())],
            Securable::Table(c, s, _) => vec![
                self.clone(),
                Securable::Schema(c.clone(), s.clone()),
                Securable::Catalog(c.clone()),
            ],
        }
    }

    /// The kind as Databricks names it in permission errors ("Catalog", "Schema", "Table").
    pub fn kind(&self) -> &'static str {
        match self {
            Securable::Catalog(_) => "Catalog",
            Securable::Schema(..) => "Schema",
            Securable::Table(..) => "Table",
        }
    }
}

impl fmt::Display for Securable {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Securable::Catalog(c) => write!(f, "{c}"),
            Securable::Schema(c, s) => write!(f, "{c}.{s}"),
            Securable::Table(c, s, t) => write!(f, "{c}.{s}.{t}"),
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
        }
    }
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
            user("7001000000000002", "bob", &["contractors"]),
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
        };

        Fixture {
            users,
            groups,
            catalogs: vec![Catalog {
                name: "main".into(),
                owner: "admins".into(),
                comment: Some("Main catalog".into()),
            }],
            schemas: ["default", "sales", "hr"]
                .iter()
                .map(|name| Schema {
                    catalog: "main".into(),
                    name: name.to_string(),
                    owner: "admins".into(),
                    comment: None,
                })
                .collect(),
            tables: vec![orders, salaries],
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
            ],
            warehouses: vec![Warehouse {
                id: WAREHOUSE_ID.into(),
                name: "Sandbox Serverless Warehouse".into(),
                can_use: vec![ALL_USERS_GROUP.into()],
            }],
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

    pub fn warehouse(&self, id: &str) -> Option<&Warehouse> {
        self.warehouses.iter().find(|w| w.id == id)
    }

    fn owner_of(&self, securable: &Securable) -> Option<&str> {
        match securable {
            Securable::Catalog(c) => self.catalog(c).map(|c| c.owner.as_str()),
            Securable::Schema(c, s) => self.schema(c, s).map(|s| s.owner.as_str()),
            Securable::Table(c, s, t) => self.table(c, s, t).map(|t| t.owner.as_str()),
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
}
