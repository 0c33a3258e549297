//! An error with its causes, as one line.

use std::error::Error;
use std::fmt;

/// `e` and its causes (its [`Error::source`] chain) as one line, `what: why: root cause`: the
/// form the `natpunch` binary prints errors in.
///
/// natpunch's errors say their cause once: they return it from `source()` and keep it out of
/// their own message, so `e.to_string()` alone gives only the first clause. Use this wherever
/// such an error becomes text other than through `anyhow`'s `{:#}` (logs, reports, strings
/// handed on).
///
/// ```
/// let e = natlab::Topology::from_toml("[router.r]\nnat = \"weird\"").expect_err("unknown");
/// assert_eq!(
///     natlab::chain(&e).to_string(),
///     "router `r`: unknown NAT preset `weird` (known: open, full-cone, restricted-cone, \
///      port-restricted, symmetric, symmetric-sequential, cgnat)"
/// );
/// ```
pub fn chain<'a>(e: &'a (dyn Error + 'a)) -> Chain<'a> {
    Chain(e)
}

/// An error displayed with its causes; see [`chain`].
#[derive(Debug, Clone, Copy)]
pub struct Chain<'a>(&'a (dyn Error + 'a));

impl fmt::Display for Chain<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)?;
        let mut cause = self.0.source();
        while let Some(e) = cause {
            write!(f, ": {e}")?;
            cause = e.source();
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, thiserror::Error)]
    #[error("reading the file")]
    struct Outer(#[source] std::io::Error);

    #[test]
    fn the_chain_says_each_cause_once_in_order() {
        let io = std::io::Error::from_raw_os_error(2);
        let e = Outer(io);
        assert_eq!(e.to_string(), "reading the file");
        assert_eq!(
            chain(&e).to_string(),
            "reading the file: No such file or directory (os error 2)"
        );
        let plain = std::io::Error::other("plain");
        assert_eq!(chain(&plain).to_string(), "plain");
    }
}
