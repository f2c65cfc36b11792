//! The one way kabuto prints an error: its message, then the message of
//! each `source()` in turn, joined by `": "`.
//!
//! kabuto's errors are thiserror enums whose causes sit in `#[source]` and
//! are not repeated in their own message, so printing the chain shows each
//! cause exactly once. Binaries that use anyhow print with `{:#}`, which
//! is the same format.

use std::error::Error;
use std::fmt;

/// Displays `error` with its causes: `outer: cause: root cause`.
pub struct Chain<'a>(pub &'a (dyn Error + 'a));

impl fmt::Display for Chain<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)?;
        let mut source = self.0.source();
        while let Some(cause) = source {
            write!(f, ": {cause}")?;
            source = cause.source();
        }
        Ok(())
    }
}

/// `error` and its causes as one line (see [`Chain`]).
pub fn chain(error: &(dyn Error + '_)) -> String {
    Chain(error).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, thiserror::Error)]
    #[error("reading the config")]
    struct Outer(#[source] Middle);

    #[derive(Debug, thiserror::Error)]
    #[error("parsing line 3")]
    struct Middle(#[source] std::io::Error);

    #[test]
    fn each_cause_is_printed_once_in_order() {
        let e = Outer(Middle(std::io::Error::other("unexpected end")));
        assert_eq!(
            chain(&e),
            "reading the config: parsing line 3: unexpected end"
        );
        assert_eq!(chain(&std::io::Error::other("alone")), "alone");
    }
}
