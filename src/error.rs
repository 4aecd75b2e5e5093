//! Error kinds that decide kiln's exit code.
//!
//! Everything is an `anyhow::Error`; an input or usage problem is marked by wrapping a
//! [`UserError`] somewhere in its chain, which makes `main` exit with 2 instead of 1.

use std::fmt;

/// A problem with what the user gave kiln (a base, a definition, a flag), as opposed to
/// a failure of the build itself. The message says what happened, where, and what to do.
#[derive(Debug)]
pub struct UserError(pub String);

impl fmt::Display for UserError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for UserError {}

/// Build an `anyhow::Error` that exits with code 2.
pub fn user(msg: impl Into<String>) -> anyhow::Error {
    anyhow::Error::new(UserError(msg.into()))
}

/// `bail!` for user errors.
#[macro_export]
macro_rules! user_bail {
    ($($arg:tt)*) => { return Err($crate::error::user(format!($($arg)*))) };
}

/// Exit code for an error: 2 for input and usage errors, 1 for build failures.
pub fn exit_code(err: &anyhow::Error) -> i32 {
    if err.chain().any(|e| e.downcast_ref::<UserError>().is_some()) {
        2
    } else {
        1
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use anyhow::Context;

    #[test]
    fn user_error_survives_context() {
        let e: anyhow::Result<()> = Err(user("bad base"));
        let e = e.context("acquire").unwrap_err();
        assert_eq!(exit_code(&e), 2);
        assert_eq!(exit_code(&anyhow::anyhow!("mkfs failed")), 1);
    }
}
