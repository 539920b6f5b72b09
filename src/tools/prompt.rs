//! Reading a secret's value for `set`: a hidden prompt on a terminal (asked twice, so a typo
//! is not stored unnoticed), or the whole of stdin when piped. Never echoed.

use std::io::{IsTerminal as _, Read as _};
use zeroize::Zeroizing;

use super::error::Error;
use crate::api::SecretString;

/// Where the value comes from. The terminal and stdin in the binary; a script in tests.
pub trait ValueReader {
    /// Whether a person is typing (a hidden prompt), rather than a pipe.
    fn is_terminal(&self) -> bool;
    /// Show `prompt` and read one line without echoing it.
    fn prompt_hidden(&mut self, prompt: &str) -> std::io::Result<Zeroizing<String>>;
    /// Read the whole of a piped input.
    fn read_all(&mut self) -> std::io::Result<Zeroizing<String>>;
}

/// The process's terminal and stdin.
#[derive(Debug, Default)]
pub struct Stdin;

impl ValueReader for Stdin {
    fn is_terminal(&self) -> bool {
        std::io::stdin().is_terminal()
    }

    fn prompt_hidden(&mut self, prompt: &str) -> std::io::Result<Zeroizing<String>> {
        rpassword::prompt_password(prompt).map(Zeroizing::new)
    }

    fn read_all(&mut self) -> std::io::Result<Zeroizing<String>> {
        let mut value = Zeroizing::new(String::new());
        std::io::stdin().lock().read_to_string(&mut value)?;
        Ok(value)
    }
}

/// Whether `set` creates the secret or changes an existing one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Purpose {
    Create,
    Update,
}

/// Read the value of `env_name`. Empty means "none given" (an update then keeps the current
/// value). On a terminal, a value typed is asked for a second time and must match: the
/// first entry is hidden, so a typo could not be seen.
pub fn read_value(
    reader: &mut dyn ValueReader,
    env_name: &str,
    purpose: Purpose,
) -> Result<SecretString, Error> {
    if !reader.is_terminal() {
        let all = reader.read_all().map_err(|source| Error::ReadValue {
            from: "stdin",
            source,
        })?;
        // `echo value |` and here-strings add one newline that is not part of the value.
        let value = all
            .strip_suffix("\r\n")
            .or_else(|| all.strip_suffix('\n'))
            .unwrap_or(&all);
        return Ok(SecretString::new(value.to_owned()));
    }
    let hint = match purpose {
        Purpose::Create => "hidden",
        Purpose::Update => "hidden; empty keeps the current value",
    };
    let terminal = |source| Error::ReadValue {
        from: "the terminal",
        source,
    };
    let first = reader
        .prompt_hidden(&format!("Value for {env_name} ({hint}): "))
        .map_err(terminal)?;
    if first.is_empty() {
        return Ok(SecretString::new(String::new()));
    }
    let again = reader
        .prompt_hidden(&format!("Value for {env_name} again: "))
        .map_err(terminal)?;
    if *first != *again {
        return Err(Error::ValueMismatch);
    }
    Ok(SecretString::new(first.as_str().to_owned()))
}

#[cfg(test)]
pub(crate) mod fake {
    use super::*;

    /// A scripted terminal or pipe that records the prompts it was shown.
    #[derive(Debug, Default)]
    pub struct FakeReader {
        pub terminal: bool,
        pub answers: Vec<&'static str>,
        pub piped: &'static str,
        pub prompts: Vec<String>,
    }

    impl ValueReader for FakeReader {
        fn is_terminal(&self) -> bool {
            self.terminal
        }

        fn prompt_hidden(&mut self, prompt: &str) -> std::io::Result<Zeroizing<String>> {
            self.prompts.push(prompt.to_owned());
            if self.answers.is_empty() {
                return Err(std::io::ErrorKind::UnexpectedEof.into());
            }
            Ok(Zeroizing::new(self.answers.remove(0).to_owned()))
        }

        fn read_all(&mut self) -> std::io::Result<Zeroizing<String>> {
            Ok(Zeroizing::new(self.piped.to_owned()))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::fake::FakeReader;
    use super::*;

    fn terminal(answers: &[&'static str]) -> FakeReader {
        FakeReader {
            terminal: true,
            answers: answers.to_vec(),
            ..FakeReader::default()
        }
    }

    #[test]
    fn creating_on_a_terminal_asks_twice_and_takes_matching_entries() {
        let mut reader = terminal(&["s3cret", "s3cret"]);
        let value = read_value(&mut reader, "X_API_KEY", Purpose::Create).unwrap();
        assert_eq!(value.expose(), "s3cret");
        assert_eq!(
            reader.prompts,
            [
                "Value for X_API_KEY (hidden): ",
                "Value for X_API_KEY again: "
            ]
        );
    }

    #[test]
    fn entries_that_differ_are_refused_without_showing_either() {
        let mut reader = terminal(&["s3cret", "s3cert"]);
        let error = read_value(&mut reader, "X_API_KEY", Purpose::Create).unwrap_err();
        assert!(matches!(error, Error::ValueMismatch), "{error}");
        let text = format!("{error} {error:?}");
        assert!(!text.contains("s3c"), "{text}");
    }

    #[test]
    fn an_empty_first_entry_is_not_asked_again() {
        let mut reader = terminal(&[""]);
        let value = read_value(&mut reader, "X_API_KEY", Purpose::Update).unwrap();
        assert!(value.expose().is_empty());
        assert_eq!(reader.prompts.len(), 1);
        assert!(reader.prompts[0].contains("empty keeps the current value"));
    }

    #[test]
    fn a_new_value_on_update_is_confirmed_too() {
        let mut reader = terminal(&["new", "other"]);
        assert!(matches!(
            read_value(&mut reader, "X_API_KEY", Purpose::Update),
            Err(Error::ValueMismatch)
        ));
    }

    #[test]
    fn a_closed_terminal_is_an_error_not_an_empty_value() {
        let mut reader = terminal(&["only-once"]);
        let error = read_value(&mut reader, "X_API_KEY", Purpose::Create).unwrap_err();
        assert!(matches!(error, Error::ReadValue { .. }), "{error}");
    }

    #[test]
    fn piped_input_is_read_once_without_prompting_and_loses_one_newline() {
        for (piped, expected) in [
            ("tok\n", "tok"),
            ("tok\r\n", "tok"),
            ("tok", "tok"),
            ("line1\nline2\n\n", "line1\nline2\n"),
            ("", ""),
        ] {
            let mut reader = FakeReader {
                piped,
                ..FakeReader::default()
            };
            let value = read_value(&mut reader, "X_API_KEY", Purpose::Create).unwrap();
            assert_eq!(value.expose(), expected, "{piped:?}");
            assert!(reader.prompts.is_empty());
        }
    }
}
