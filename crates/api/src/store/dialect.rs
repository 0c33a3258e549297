//! The two SQL dialects: statements are written once, with marks where SQLite and PostgreSQL
//! differ, and rendered per backend when the store opens.

use super::Backend;

/// Renders the dialect marks of `sql` for `backend`. A mark is `{kind $n}`:
/// - `ts`: a Unix-nanosecond integer (kept as is in SQLite, a TIMESTAMPTZ in PostgreSQL);
/// - `interval`: seconds as a float (REAL, INTERVAL);
/// - `secs`: an interval column read back as seconds;
/// - `epoch`: a timestamp column read back as whole Unix seconds;
/// - `TYPE[]`: a JSON array given as text (kept as JSON text, an array of TYPE);
/// - `each TYPE`: the elements of a JSON array as rows, for `IN (SELECT {each TYPE $n})`;
/// - `in TYPE`: `IN` the elements of a JSON array, for `column {in TYPE $n}`; unlike `IN
///   (SELECT {each …})`, PostgreSQL looks them up in the column's index (an array it compares
///   with `= ANY`) rather than joining with a scan of the table;
/// - `recordset $n x(col type, …)`: the rows of a JSON array of objects given as text, as a
///   table `x` with those columns, for `INSERT … SELECT … FROM {recordset $n x(…)}`: one statement
///   stores any number of rows;
/// - `overriding`: `OVERRIDING SYSTEM VALUE` in PostgreSQL (ids given for identity columns),
///   nothing in SQLite;
/// - any other word: a cast to that type in PostgreSQL (enum types, `inet`, `bigint`), nothing
///   in SQLite.
pub fn render(sql: &str, backend: Backend) -> String {
    let mut out = String::with_capacity(sql.len() * 2);
    let mut rest = sql;
    while let Some(start) = rest.find('{') {
        out.push_str(rest.get(..start).unwrap_or_default());
        let after = rest.get(start + 1..).unwrap_or_default();
        let Some(end) = after.find('}') else {
            out.push_str(rest.get(start..).unwrap_or_default());
            rest = "";
            break;
        };
        let mark = after.get(..end).unwrap_or_default();
        rest = after.get(end + 1..).unwrap_or_default();
        if let Some(recordset) = mark.strip_prefix("recordset ") {
            out.push_str(
                &render_recordset(recordset, backend).unwrap_or_else(|| format!("{{{mark}}}")),
            );
            continue;
        }
        let words: Vec<&str> = mark.split_whitespace().collect();
        let piece = match (backend, words.as_slice()) {
            (Backend::Sqlite, ["overriding"]) => String::new(),
            (Backend::Postgres, ["overriding"]) => "OVERRIDING SYSTEM VALUE".to_owned(),
            (Backend::Sqlite, ["each", _, x]) => format!("value FROM json_each({x})"),
            (Backend::Sqlite, ["in", _, x]) => format!("IN (SELECT value FROM json_each({x}))"),
            (Backend::Postgres, ["in", ty, x]) => {
                format!("= ANY(ARRAY(SELECT jsonb_array_elements_text(({x})::jsonb)::{ty}))")
            }
            (Backend::Postgres, ["each", ty, x]) => {
                format!("jsonb_array_elements_text(({x})::jsonb)::{ty}")
            }
            (Backend::Sqlite, ["epoch", x]) => format!("({x} / 1000000000)"),
            (Backend::Sqlite, [_, x]) => (*x).to_owned(),
            (Backend::Postgres, ["ts", x]) => {
                format!("(timestamptz 'epoch' + (({x}) / 1000)::float8 * interval '1 microsecond')")
            }
            (Backend::Postgres, ["interval", x]) => format!("make_interval(secs => {x})"),
            (Backend::Postgres, ["secs", x]) => format!("extract(epoch from {x})::float8"),
            (Backend::Postgres, ["epoch", x]) => {
                format!("floor(extract(epoch from {x}))::bigint")
            }
            (Backend::Postgres, [ty, x]) => match ty.strip_suffix("[]") {
                Some(elem) => {
                    format!("ARRAY(SELECT jsonb_array_elements_text(({x})::jsonb)::{elem})")
                }
                None => format!("({x})::{ty}"),
            },
            _ => format!("{{{mark}}}"),
        };
        out.push_str(&piece);
    }
    out.push_str(rest);
    out
}

/// `$n x(col type, …)` as a table: PostgreSQL's `jsonb_to_recordset`, or SQLite's `json_each`
/// with each column taken out of the object by name.
fn render_recordset(mark: &str, backend: Backend) -> Option<String> {
    let (param, table) = mark.trim().split_once(' ')?;
    let (alias, columns) = table.trim().split_once('(')?;
    let columns = columns.strip_suffix(')')?;
    Some(match backend {
        Backend::Postgres => format!("jsonb_to_recordset(({param})::jsonb) AS {alias}({columns})"),
        Backend::Sqlite => {
            let picks: Vec<String> = columns
                .split(',')
                .filter_map(|c| c.split_whitespace().next())
                .map(|c| format!("value ->> '{c}' AS {c}"))
                .collect();
            format!(
                "(SELECT {} FROM json_each({param})) AS {alias}",
                picks.join(", ")
            )
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn marks_render_per_dialect() {
        let sql = "SELECT {ts $1}, {text[] $2}, {hole_punch_outcome $3} IN (SELECT {each bigint $4}), \
             $5 {in text $5}";
        assert_eq!(
            render(sql, Backend::Sqlite),
            "SELECT $1, $2, $3 IN (SELECT value FROM json_each($4)), \
             $5 IN (SELECT value FROM json_each($5))"
        );
        let pg = render(sql, Backend::Postgres);
        assert!(pg.contains("timestamptz 'epoch'"), "{pg}");
        assert!(
            pg.contains("ARRAY(SELECT jsonb_array_elements_text(($2)::jsonb)::text)"),
            "{pg}"
        );
        assert!(pg.contains("($3)::hole_punch_outcome"), "{pg}");
        assert!(
            pg.contains("jsonb_array_elements_text(($4)::jsonb)::bigint"),
            "{pg}"
        );
        assert!(
            pg.ends_with("$5 = ANY(ARRAY(SELECT jsonb_array_elements_text(($5)::jsonb)::text))"),
            "{pg}"
        );
    }

    #[test]
    fn a_recordset_is_a_table_in_both_dialects() {
        let sql = "INSERT INTO t (a, b) {overriding} SELECT x.a, {ts x.b} \
            FROM {recordset $1 x(a bigint, b bigint)}";
        assert_eq!(
            render(sql, Backend::Sqlite),
            "INSERT INTO t (a, b)  SELECT x.a, x.b FROM (SELECT value ->> 'a' AS a, \
             value ->> 'b' AS b FROM json_each($1)) AS x"
        );
        let pg = render(sql, Backend::Postgres);
        assert!(
            pg.starts_with("INSERT INTO t (a, b) OVERRIDING SYSTEM VALUE SELECT x.a, "),
            "{pg}"
        );
        assert!(
            pg.ends_with("FROM jsonb_to_recordset(($1)::jsonb) AS x(a bigint, b bigint)"),
            "{pg}"
        );
    }
}
