//! The schema: each migration is written once, in PostgreSQL's dialect (`migrations/`), rendered
//! for the backend when the store opens, and applied by sqlx's migrator. The template's rules
//! are at the top of `migrations/0001_schema.sql`.
//!
//! Until the template, each backend had its own copy of the schema; the rendering gives back
//! those files byte for byte, so the checksums sqlx stored in existing databases still match.

use std::borrow::Cow;
use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;

use sqlx::error::BoxDynError;
use sqlx::migrate::{MigrateError, Migration, MigrationSource, MigrationType, Migrator};

use super::Backend;

/// The migrations in order: version and description (as sqlx read them from the file names,
/// `0001_schema.sql`, when each backend had its own folder) and the template.
const MIGRATIONS: [(i64, &str, &str); 1] = [(
    1,
    "schema",
    include_str!("../../migrations/0001_schema.sql"),
)];

/// PostgreSQL's identity primary key: the one column type of several words.
const IDENTITY: &str = "BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY";
/// SQLite's column types are padded to the widest of them, INTEGER.
const SQLITE_TYPE_WIDTH: usize = 7;
/// An enum's CHECK is wrapped so that no line is longer than this.
const MAX_LINE: usize = 100;

/// The rest of `line` when it belongs to one backend only (`@sqlite …`, `@postgres …`).
fn own_line<'a>(line: &'a str, tag: &str) -> Option<&'a str> {
    let rest = line.strip_prefix(tag)?;
    if rest.is_empty() {
        Some(rest)
    } else {
        rest.strip_prefix(' ')
    }
}

/// The values of each enum type the template creates, quoted as SQL writes them.
fn enums(template: &str) -> HashMap<String, Vec<String>> {
    let postgres = template
        .split('\n')
        .filter_map(|l| own_line(l, "@postgres"))
        .collect::<Vec<_>>()
        .join("\n");
    let mut out = HashMap::new();
    let mut rest = postgres.as_str();
    while let Some((_, after)) = rest.split_once("CREATE TYPE ") {
        let Some((name, body)) = after.split_once(" AS ENUM (") else {
            break;
        };
        let Some((values, tail)) = body.split_once(");") else {
            break;
        };
        let values = values
            .split(',')
            .map(str::trim)
            .filter(|v| !v.is_empty())
            .map(str::to_owned)
            .collect();
        out.insert(name.trim().to_owned(), values);
        rest = tail;
    }
    out
}

/// SQLite's type for PostgreSQL's `ty`, or `None` when `ty` is not a column type.
fn sqlite_type(ty: &str, enums: &HashMap<String, Vec<String>>) -> Option<&'static str> {
    Some(match ty {
        IDENTITY => "INTEGER PRIMARY KEY",
        "BIGINT" | "INT" | "TIMESTAMPTZ" | "BOOLEAN" => "INTEGER",
        "TEXT" | "INET" => "TEXT",
        "BYTEA" => "BLOB",
        "INTERVAL" | "FLOAT8" => "REAL",
        _ if ty.ends_with("[]") || enums.contains_key(ty) => "TEXT",
        _ => return None,
    })
}

/// SQLite's form of one line of PostgreSQL's: a column definition (`    name  TYPE  rest,`) gets
/// SQLite's type, CHECK and default; any other line is kept.
fn sqlite_line(line: &str, enums: &HashMap<String, Vec<String>>) -> String {
    sqlite_column(line, enums).unwrap_or_else(|| line.to_owned())
}

fn sqlite_column(line: &str, enums: &HashMap<String, Vec<String>>) -> Option<String> {
    let body = line.strip_prefix("    ")?;
    let (name, _) = body.split_once(' ')?;
    if name.is_empty()
        || !name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
    {
        return None;
    }
    let after_name = body.get(name.len()..)?;
    let rest = after_name.trim_start_matches(' ');
    let field = line.get(..line.len() - rest.len())?;
    let (ty, tail) = match rest.strip_prefix(IDENTITY) {
        Some(tail) => (IDENTITY, tail),
        None => rest.split_at(rest.find([' ', ',']).unwrap_or(rest.len())),
    };
    let sqlite = sqlite_type(ty, enums)?;
    let (constraints, comma) = match tail.strip_suffix(',') {
        Some(t) => (t.trim(), ","),
        None => (tail.trim(), ""),
    };
    if constraints.is_empty() {
        return Some(format!("{field}{sqlite}{comma}"));
    }
    let head = format!(
        "{field}{sqlite:<SQLITE_TYPE_WIDTH$} {}",
        constraints.replace("'{}'", "'[]'")
    );
    if ty == "BOOLEAN" {
        return Some(format!("{head} CHECK ({name} IN (0, 1)){comma}"));
    }
    let Some(values) = enums.get(ty) else {
        return Some(format!("{head}{comma}"));
    };
    // The enum's values, as many on a line as fit, continued under the column's type.
    let indent = " ".repeat(field.len() + 4);
    let mut lines = Vec::new();
    let mut current = format!("{head} CHECK ({name} IN (");
    for (i, value) in values.iter().enumerate() {
        let piece = if i + 1 == values.len() {
            format!("{value})){comma}")
        } else {
            format!("{value},")
        };
        let opening = current.ends_with('(');
        let joined = if opening {
            format!("{current}{piece}")
        } else {
            format!("{current} {piece}")
        };
        if joined.len() > MAX_LINE && !opening {
            lines.push(std::mem::replace(&mut current, format!("{indent}{piece}")));
        } else {
            current = joined;
        }
    }
    lines.push(current);
    Some(lines.join("\n"))
}

/// Renders a migration template for `backend`.
fn render(template: &str, backend: Backend) -> String {
    let enums = enums(template);
    let mut out = Vec::new();
    for line in template.split('\n') {
        if line.starts_with('#') {
            continue;
        }
        if let Some(rest) = own_line(line, "@sqlite") {
            if backend == Backend::Sqlite {
                out.push(rest.to_owned());
            }
            continue;
        }
        if let Some(rest) = own_line(line, "@postgres") {
            if backend == Backend::Postgres {
                out.push(rest.to_owned());
            }
            continue;
        }
        out.push(match backend {
            Backend::Postgres => line.to_owned(),
            Backend::Sqlite => sqlite_line(line, &enums),
        });
    }
    out.join("\n")
}

/// The migrations rendered for `backend`, each with the checksum sqlx computes from its SQL.
fn migrations(backend: Backend) -> Vec<Migration> {
    MIGRATIONS
        .iter()
        .map(|(version, description, template)| {
            Migration::new(
                *version,
                Cow::Borrowed(*description),
                MigrationType::Simple,
                Cow::Owned(render(template, backend)),
                false,
            )
        })
        .collect()
}

/// The rendered migrations as a source for sqlx's migrator.
#[derive(Debug)]
struct Rendered(Backend);

impl MigrationSource<'static> for Rendered {
    fn resolve(
        self,
    ) -> Pin<Box<dyn Future<Output = Result<Vec<Migration>, BoxDynError>> + Send + 'static>> {
        Box::pin(std::future::ready(Ok(migrations(self.0))))
    }
}

/// sqlx's migrator for `backend`.
pub(super) async fn migrator(backend: Backend) -> Result<Migrator, MigrateError> {
    Migrator::new(Rendered(backend)).await
}

#[cfg(test)]
mod tests {
    use super::*;

    /// SHA-384 of `migrations/sqlite/0001_schema.sql` and `migrations/postgres/0001_schema.sql`
    /// as they were when each backend had its own file: what sqlx stored in `_sqlx_migrations` of
    /// every database made before the template.
    const CHECKSUMS: [(Backend, &str); 2] = [
        (
            Backend::Sqlite,
            "e7d73b403151b0c90caf412f0fcad65dfa541ca13fdf2f0c8149ada1c20b4e5e\
             91a99f798a3c3febd91c4bd98492a735",
        ),
        (
            Backend::Postgres,
            "717b0c59bc5c3471f6fda6492027b0045e7fa54ba8bad20dbf8a713b4c1175bb\
             485762c28ffd8a42883c205bcf81cc86",
        ),
    ];

    #[test]
    fn the_rendered_schema_keeps_the_checksum_existing_databases_were_migrated_with() {
        for (backend, checksum) in CHECKSUMS {
            let schema = &migrations(backend)[0];
            let hex: String = schema.checksum.iter().map(|b| format!("{b:02x}")).collect();
            assert_eq!(
                hex, checksum,
                "{backend:?}: the schema of existing databases changed; add a migration instead"
            );
            assert_eq!((schema.version, &*schema.description), (1, "schema"));
            assert!(!schema.no_tx);
        }
    }

    #[test]
    fn every_column_of_the_schema_has_a_type_sqlite_knows() {
        for (_, _, template) in MIGRATIONS {
            let enums = enums(template);
            let mut in_table = false;
            for line in template.split('\n') {
                if line.starts_with("CREATE TABLE") {
                    in_table = true;
                } else if line.starts_with(");") {
                    in_table = false;
                } else if in_table
                    && !line.starts_with("    UNIQUE")
                    && !line.starts_with("    PRIMARY")
                {
                    assert!(sqlite_column(line, &enums).is_some(), "{line}");
                }
            }
        }
    }

    #[test]
    fn sqlite_columns_are_derived_from_postgresqls() {
        let template = "@postgres CREATE TYPE color AS ENUM ('RED', 'GREEN');\n\
            CREATE TABLE t (\n    \
            id     BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,\n    \
            seen   TIMESTAMPTZ NOT NULL,\n    \
            ok     BOOLEAN     NOT NULL,\n    \
            hue    color       NOT NULL,\n    \
            tags   TEXT[]      NOT NULL DEFAULT '{}',\n    \
            UNIQUE (seen)\n\
            );\n\
            # a note\n\
            @sqlite -- SQLite only";
        assert_eq!(
            render(template, Backend::Sqlite),
            "CREATE TABLE t (\n    \
            id     INTEGER PRIMARY KEY,\n    \
            seen   INTEGER NOT NULL,\n    \
            ok     INTEGER NOT NULL CHECK (ok IN (0, 1)),\n    \
            hue    TEXT    NOT NULL CHECK (hue IN ('RED', 'GREEN')),\n    \
            tags   TEXT    NOT NULL DEFAULT '[]',\n    \
            UNIQUE (seen)\n\
            );\n\
            -- SQLite only"
        );
        assert!(render(template, Backend::Postgres).starts_with("CREATE TYPE color"));
    }
}
