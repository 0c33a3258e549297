//! The two SQL dialects: statements are written once, with marks where SQLite and PostgreSQL
//! differ, and rendered per backend when the store opens.

use super::Backend;

/// Renders the dialect marks of `sql` for `backend`. A mark is `{kind $n}`:
/// - `ts`: a Unix-nanosecond integer (kept as is in SQLite, a TIMESTAMPTZ in PostgreSQL);
/// - `interval`: seconds as a float (REAL, INTERVAL);
/// - `secs`: an interval column read back as seconds;
/// - `TYPE[]`: a JSON array given as text (kept as JSON text, an array of TYPE);
/// - `each TYPE`: the elements of a JSON array as rows, for `IN (SELECT {each TYPE $n})`;
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
        let words: Vec<&str> = mark.split_whitespace().collect();
        let piece = match (backend, words.as_slice()) {
            (Backend::Sqlite, ["each", _, x]) => format!("value FROM json_each({x})"),
            (Backend::Postgres, ["each", ty, x]) => {
                format!("jsonb_array_elements_text(({x})::jsonb)::{ty}")
            }
            (Backend::Sqlite, [_, x]) => (*x).to_owned(),
            (Backend::Postgres, ["ts", x]) => {
                format!("(timestamptz 'epoch' + (({x}) / 1000)::float8 * interval '1 microsecond')")
            }
            (Backend::Postgres, ["interval", x]) => format!("make_interval(secs => {x})"),
            (Backend::Postgres, ["secs", x]) => format!("extract(epoch from {x})::float8"),
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn marks_render_per_dialect() {
        let sql =
            "SELECT {ts $1}, {text[] $2}, {hole_punch_outcome $3} IN (SELECT {each bigint $4})";
        assert_eq!(
            render(sql, Backend::Sqlite),
            "SELECT $1, $2, $3 IN (SELECT value FROM json_each($4))"
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
    }
}
