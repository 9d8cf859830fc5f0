//! The words after a command name: `--flag`, `--option value` (or `--option=value`) and positionals.

/// Arguments of one command, consumed by its parser; whatever is left over is an error.
#[derive(Debug, Clone)]
pub struct Args {
    words: Vec<Option<String>>,
}

impl Args {
    pub fn new(words: Vec<String>) -> Self {
        // Split `--name=value` so both spellings work alike.
        let mut split = Vec::with_capacity(words.len());
        for w in words {
            match w.split_once('=') {
                Some((name, value)) if name.starts_with("--") => {
                    split.push(Some(name.to_owned()));
                    split.push(Some(value.to_owned()));
                }
                _ => split.push(Some(w)),
            }
        }
        Args { words: split }
    }

    /// Takes `--name` if present.
    pub fn flag(&mut self, name: &str) -> bool {
        let found = self.words.iter().position(|w| w.as_deref() == Some(name));
        if let Some(i) = found {
            self.words[i] = None;
        }
        found.is_some()
    }

    /// Takes every `--name VALUE`. A `--name` with no value after it is an error.
    pub fn options(&mut self, name: &str) -> Result<Vec<String>, String> {
        let mut values = Vec::new();
        let mut i = 0;
        while i < self.words.len() {
            if self.words[i].as_deref() == Some(name) {
                self.words[i] = None;
                match self.words.get_mut(i + 1).and_then(Option::take) {
                    Some(v) if !v.starts_with("--") => values.push(v),
                    _ => return Err(format!("`{name}` needs a value")),
                }
                i += 1;
            }
            i += 1;
        }
        Ok(values)
    }

    /// Takes `--name VALUE` given at most once.
    pub fn option(&mut self, name: &str) -> Result<Option<String>, String> {
        let mut values = self.options(name)?;
        if values.len() > 1 {
            return Err(format!("`{name}` given more than once"));
        }
        Ok(values.pop())
    }

    /// Takes the next positional word.
    pub fn positional(&mut self) -> Option<String> {
        let i = self.words.iter().position(|w| w.as_deref().is_some_and(|w| !w.starts_with("--")))?;
        self.words[i].take()
    }

    /// Fails on the first word no parser took.
    pub fn finish(self) -> Result<(), String> {
        match self.words.into_iter().flatten().next() {
            None => Ok(()),
            Some(w) if w.starts_with("--") => Err(format!("unknown option `{w}`")),
            Some(w) => Err(format!("unexpected argument `{w}`")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(s: &str) -> Args {
        Args::new(shell_words::split(s).unwrap())
    }

    #[test]
    fn flags_options_positionals() {
        let mut a = args("CODE --only dms --exclude '!a:x' --exclude=!b:x --dry-run");
        assert!(a.flag("--dry-run"));
        assert!(!a.flag("--auto"));
        assert_eq!(a.option("--only").unwrap().as_deref(), Some("dms"));
        assert_eq!(a.options("--exclude").unwrap(), vec!["!a:x", "!b:x"]);
        assert_eq!(a.positional().as_deref(), Some("CODE"));
        assert!(a.finish().is_ok());
    }

    #[test]
    fn leftovers_and_missing_values_are_errors() {
        let mut a = args("--only");
        assert_eq!(a.option("--only").unwrap_err(), "`--only` needs a value");
        let a = args("--bogus");
        assert_eq!(a.finish().unwrap_err(), "unknown option `--bogus`");
        let mut a = args("--to @a:b --to @c:d");
        assert!(a.option("--to").unwrap_err().contains("more than once"));
    }
}
