//! How both programs say what went wrong: the error and its causes on one line, each cause
//! once. Pure formatting, shared so that `synchub` and `synchub-agent` print errors alike.

use std::error::Error;

/// The error and its causes, `: `-separated, each said once: an error whose message already
/// quotes its cause is not followed by that cause again.
pub fn error_chain(error: &(dyn Error + 'static)) -> String {
    let mut text = error.to_string();
    let mut cause = error.source();
    while let Some(e) = cause {
        let said = e.to_string();
        if !text.contains(&said) {
            text.push_str(": ");
            text.push_str(&said);
        }
        cause = e.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug)]
    struct Wrapped {
        message: String,
        source: std::io::Error,
    }

    impl std::fmt::Display for Wrapped {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str(&self.message)
        }
    }

    impl Error for Wrapped {
        fn source(&self) -> Option<&(dyn Error + 'static)> {
            Some(&self.source)
        }
    }

    #[test]
    fn causes_are_added_once() {
        let quiet = Wrapped {
            message: "reading agent.toml".into(),
            source: std::io::Error::other("permission denied"),
        };
        assert_eq!(error_chain(&quiet), "reading agent.toml: permission denied");
        let quoting = Wrapped {
            message: "reading agent.toml: permission denied".into(),
            source: std::io::Error::other("permission denied"),
        };
        assert_eq!(
            error_chain(&quoting),
            "reading agent.toml: permission denied"
        );
    }
}
